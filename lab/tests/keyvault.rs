//! The Key Vault contract double (lab/src/keyvault/) against the OFFICIAL Azure SDK for Rust clients
//! (`azure_security_keyvault_secrets` / `azure_security_keyvault_keys` 1.0.0 on azure_core 1.1), over
//! HTTPS with a lab-CA certificate. Every test talks to a fresh double on 127.0.0.1 with free ports.

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::error::ErrorKind;
use azure_core::http::{ClientOptions, FixedRetryOptions, RetryOptions, Transport};
use azure_core::time::{Duration as AzDuration, OffsetDateTime};
use azure_security_keyvault_keys::models::{
    CreateKeyParameters, EncryptionAlgorithm, KeyClientGetKeyOptions, KeyClientWrapKeyOptions,
    KeyOperationParameters, KeyType,
};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions, ResourceExt, ResourceId};
use azure_security_keyvault_secrets::models::{SecretClientGetSecretOptions, SetSecretParameters};
use azure_security_keyvault_secrets::{SecretClient, SecretClientOptions};
use hashistack_lab::imds::{self, lab_token_for, ImdsState, LAB_TENANT};
use hashistack_lab::keyvault::{
    actions, principals, roles, wrap_locally, Fault, KeyVaultDouble, Op, Scope, Throttle,
    VaultSpec, ESCROW_KEY, ESCROW_VAULT, SERVERS_VAULT, SHARED_VAULT, STATUS_VAULT,
};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Fixture {
    kv: KeyVaultDouble,
    http: reqwest::Client,
    cert_pem: String,
    key_pem: String,
    _dir: tempfile::TempDir,
}

fn tls_material() -> (String, String, String) {
    let now = time::OffsetDateTime::now_utc();
    let (ca_pem, ca_key) =
        hashistack_agent::tls::generate_ca("kv double test CA", 2, now).expect("CA");
    let ca = hashistack_agent::tls::ClusterCa::from_pem(&ca_pem, &ca_key).expect("CA");
    let leaf = ca
        .issue(
            "kv double",
            &["127.0.0.1".into(), "localhost".into()],
            2,
            now,
        )
        .expect("leaf");
    (ca_pem, leaf.cert_pem, leaf.key_pem)
}

fn spec(name: &str, persist: Option<std::path::PathBuf>) -> VaultSpec {
    VaultSpec {
        name: name.into(),
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        persist,
    }
}

async fn fixture() -> Fixture {
    let (ca_pem, cert_pem, key_pem) = tls_material();
    let kv = KeyVaultDouble::start(
        &cert_pem,
        &key_pem,
        &[
            spec(SHARED_VAULT, None),
            spec(ESCROW_VAULT, None),
            spec(SERVERS_VAULT, None),
            spec(STATUS_VAULT, None),
        ],
    )
    .await
    .expect("start double");
    let http = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("pem")])
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    Fixture {
        kv,
        http,
        cert_pem,
        key_pem,
        _dir: tempfile::tempdir().expect("tempdir"),
    }
}

/// Mints lab tokens (unsigned JWTs) for one principal, like the fake IMDS does.
#[derive(Debug)]
struct LabCredential {
    oid: String,
    /// Seconds from now to the JWT's `exp` (negative: an expired token).
    ttl: i64,
    calls: AtomicUsize,
}

impl LabCredential {
    fn new(oid: &str) -> Arc<Self> {
        Self::with_ttl(oid, 3600)
    }
    fn with_ttl(oid: &str, ttl: i64) -> Arc<Self> {
        Arc::new(LabCredential {
            oid: oid.into(),
            ttl,
            calls: AtomicUsize::new(0),
        })
    }
}

#[async_trait::async_trait]
impl TokenCredential for LabCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let resource = scopes[0].trim_end_matches("/.default");
        let now = OffsetDateTime::now_utc();
        let jwt = lab_token_for(resource, &self.oid, now.unix_timestamp(), self.ttl);
        // The SDK caches by this expiry; the JWT's own exp is what the double checks.
        Ok(AccessToken::new(jwt, now + AzDuration::hours(1)))
    }
}

fn client_options(http: &reqwest::Client, retry: RetryOptions) -> ClientOptions {
    ClientOptions {
        transport: Some(Transport::new(Arc::new(http.clone()))),
        retry,
        ..Default::default()
    }
}

fn quick_retries() -> RetryOptions {
    RetryOptions::fixed(FixedRetryOptions {
        delay: AzDuration::milliseconds(20),
        max_retries: 3,
        max_total_elapsed: AzDuration::seconds(20),
    })
}

fn secret_client(
    f: &Fixture,
    vault: &str,
    cred: Arc<dyn TokenCredential>,
    retry: RetryOptions,
) -> SecretClient {
    let options = SecretClientOptions {
        client_options: client_options(&f.http, retry),
        // The challenge names https://vault.azure.net; the vault is 127.0.0.1.
        verify_challenge_resource: Some(false),
        ..Default::default()
    };
    SecretClient::new(&f.kv.vault(vault).unwrap().url(), cred, Some(options)).expect("client")
}

fn key_client(f: &Fixture, vault: &str, cred: Arc<dyn TokenCredential>) -> KeyClient {
    let options = KeyClientOptions {
        client_options: client_options(&f.http, RetryOptions::none()),
        verify_challenge_resource: Some(false),
        ..Default::default()
    };
    KeyClient::new(&f.kv.vault(vault).unwrap().url(), cred, Some(options)).expect("client")
}

fn set_params(value: &str) -> SetSecretParameters {
    SetSecretParameters {
        value: Some(value.into()),
        ..Default::default()
    }
}

fn oaep256(value: Vec<u8>) -> KeyOperationParameters {
    KeyOperationParameters {
        algorithm: Some(EncryptionAlgorithm::RsaOaep256),
        value: Some(value),
        ..Default::default()
    }
}

/// (status, error code, raw body) of an SDK error; status 0 when there was no HTTP answer.
fn err_parts(e: &azure_core::Error) -> (u16, String, String) {
    match e.kind() {
        ErrorKind::HttpResponse {
            status,
            error_code,
            raw_response,
        } => (
            u16::from(*status),
            error_code.clone().unwrap_or_default(),
            raw_response
                .as_ref()
                .map(|r| String::from_utf8_lossy(r.body().as_ref()).into_owned())
                .unwrap_or_default(),
        ),
        other => (0, format!("{other:?}"), e.to_string()),
    }
}

async fn sdk_set(c: &SecretClient, name: &str, value: &str) -> azure_core::Result<String> {
    let s = c
        .set_secret(name, set_params(value).try_into()?, None)
        .await?
        .into_model()?;
    Ok(s.id.unwrap_or_default())
}

async fn sdk_get(c: &SecretClient, name: &str) -> azure_core::Result<String> {
    let s = c.get_secret(name, None).await?.into_model()?;
    Ok(s.value.unwrap_or_default())
}

const WRITER: &str = "00000000-0000-4000-8000-0000000000a1";
const READER: &str = "00000000-0000-4000-8000-0000000000a2";
const NOBODY: &str = "00000000-0000-4000-8000-0000000000a3";

#[tokio::test]
async fn secret_set_and_get_round_trip_through_the_sdk() {
    let f = fixture().await;
    let v = f.kv.vault(SHARED_VAULT).unwrap();
    v.grant(WRITER, roles::CLUSTER_MATERIAL_WRITER, Scope::Vault);
    let cred = LabCredential::new(WRITER);
    let c = secret_client(&f, SHARED_VAULT, cred.clone(), RetryOptions::none());

    let id1 = sdk_set(&c, "consul-gossip", "first value")
        .await
        .expect("set 1");
    let id2 = sdk_set(&c, "consul-gossip", "second value")
        .await
        .expect("set 2");
    assert_ne!(id1, id2, "each set makes a new version");
    assert_eq!(sdk_get(&c, "consul-gossip").await.unwrap(), "second value");
    // An older version by id.
    let version1 = id1.rsplit('/').next().unwrap().to_string();
    assert_eq!(version1.len(), 32);
    assert!(version1.bytes().all(|b| b.is_ascii_hexdigit()));
    let old = c
        .get_secret(
            "consul-gossip",
            Some(SecretClientGetSecretOptions {
                secret_version: Some(version1),
                ..Default::default()
            }),
        )
        .await
        .unwrap()
        .into_model()
        .unwrap();
    assert_eq!(old.value.as_deref(), Some("first value"));
    assert_eq!(old.id.as_deref(), Some(id1.as_str()));
    assert_eq!(v.secret_version_count("consul-gossip"), 2);

    // Not found is the documented 404 SecretNotFound.
    let e = sdk_get(&c, "missing").await.unwrap_err();
    let (status, code, _) = err_parts(&e);
    assert_eq!((status, code.as_str()), (404, "SecretNotFound"));

    // The SDK's first request went out without a token and was challenged, exactly once.
    let served = v.served();
    assert_eq!(served[0].status, 401);
    assert_eq!(served[0].principal, None);
    assert_eq!(served.iter().filter(|s| s.status == 401).count(), 1);
    assert!(served[1..]
        .iter()
        .all(|s| s.principal.as_deref() == Some(WRITER)));
    assert_eq!(
        cred.calls.load(Ordering::SeqCst),
        1,
        "token fetched once, then cached"
    );
}

#[tokio::test]
async fn create_key_then_wrap_and_unwrap_through_the_sdk() {
    let f = fixture().await;
    let v = f.kv.vault(ESCROW_VAULT).unwrap();
    v.grant(
        READER,
        &[
            actions::KEYS_CREATE,
            actions::KEYS_READ,
            actions::KEYS_WRAP,
            actions::KEYS_UNWRAP,
        ],
        Scope::Vault,
    );
    let c = key_client(&f, ESCROW_VAULT, LabCredential::new(READER));
    let params = CreateKeyParameters {
        kty: Some(KeyType::RsaHsm),
        key_size: Some(2048),
        ..Default::default()
    };
    let key = c
        .create_key("escrow-wrap", params.try_into().unwrap(), None)
        .await
        .expect("create")
        .into_model()
        .unwrap();
    let jwk = key.key.as_ref().unwrap();
    assert_eq!(jwk.n.as_ref().unwrap().len(), 256, "RSA-2048 modulus");
    assert_eq!(jwk.e.as_deref(), Some(&[1u8, 0, 1][..]));
    let created = key.resource_id().expect("kid parses as a Key Vault id");
    assert_eq!(created.name, "escrow-wrap");

    let dek: Vec<u8> = (0..32u8).collect();
    // No version: the SDK sends /keys/escrow-wrap//wrapkey, i.e. the latest version.
    let wrapped = c
        .wrap_key(
            "escrow-wrap",
            oaep256(dek.clone()).try_into().unwrap(),
            None,
        )
        .await
        .expect("wrap")
        .into_model()
        .unwrap();
    let ciphertext = wrapped.result.clone().unwrap();
    assert_eq!(ciphertext.len(), 256);
    assert_ne!(&ciphertext[..32], &dek[..]);
    let ResourceId { version, .. } = wrapped.resource_id().expect("kid");
    assert_eq!(version, created.version);
    let unwrapped = c
        .unwrap_key(
            "escrow-wrap",
            version.as_deref().unwrap(),
            oaep256(ciphertext.clone()).try_into().unwrap(),
            None,
        )
        .await
        .expect("unwrap")
        .into_model()
        .unwrap();
    assert_eq!(unwrapped.result.unwrap(), dek);

    // A tampered ciphertext does not unwrap.
    let mut bad = ciphertext;
    bad[10] ^= 1;
    let e = c
        .unwrap_key("escrow-wrap", "", oaep256(bad).try_into().unwrap(), None)
        .await
        .unwrap_err();
    assert_eq!(err_parts(&e).0, 400);

    // Only RSA-OAEP-256: RSA-OAEP (SHA-1) is refused with 400 BadParameter.
    let mut p = oaep256(vec![1, 2, 3]);
    p.algorithm = Some(EncryptionAlgorithm::RsaOaep);
    let e = c
        .wrap_key("escrow-wrap", p.try_into().unwrap(), None)
        .await
        .unwrap_err();
    let (status, code, _) = err_parts(&e);
    assert_eq!((status, code.as_str()), (400, "BadParameter"));
}

#[tokio::test]
async fn wrap_locally_with_the_public_jwk_and_unwrap_through_the_api() {
    let f = fixture().await;
    let v = f.kv.vault(ESCROW_VAULT).unwrap();
    // ARM creates the escrow key (RSA-HSM 3072); the double's admin API does the same.
    let kid = v.create_key(ESCROW_KEY, 3072).expect("admin create");
    v.grant(
        READER,
        &[actions::KEYS_READ, actions::KEYS_UNWRAP],
        Scope::Key(ESCROW_KEY.into()),
    );
    let c = key_client(&f, ESCROW_VAULT, LabCredential::new(READER));
    let key = c
        .get_key(ESCROW_KEY, None)
        .await
        .expect("get key")
        .into_model()
        .unwrap();
    let jwk = key.key.unwrap();
    assert_eq!(jwk.kid.as_deref(), Some(kid.as_str()));
    assert!(jwk.d.is_none() && jwk.p.is_none(), "public JWK only");
    let (n, e) = (jwk.n.unwrap(), jwk.e.unwrap());
    assert_eq!(n.len(), 384, "RSA-3072 modulus");

    let dek = b"0123456789abcdef0123456789abcdef".to_vec();
    let ciphertext = wrap_locally(&n, &e, &dek).expect("local OAEP-256 wrap");
    let version = kid.rsplit('/').next().unwrap();
    let out = c
        .unwrap_key(
            ESCROW_KEY,
            version,
            oaep256(ciphertext).try_into().unwrap(),
            None,
        )
        .await
        .expect("unwrap via API")
        .into_model()
        .unwrap();
    assert_eq!(out.result.unwrap(), dek);

    // A specific version can be read, and an unknown one is 404 KeyNotFound.
    let got = c
        .get_key(
            ESCROW_KEY,
            Some(KeyClientGetKeyOptions {
                key_version: Some(version.into()),
                ..Default::default()
            }),
        )
        .await
        .expect("get version");
    assert_eq!(u16::from(got.status()), 200);
    let e = c
        .get_key(
            ESCROW_KEY,
            Some(KeyClientGetKeyOptions {
                key_version: Some("0".repeat(32)),
                ..Default::default()
            }),
        )
        .await
        .unwrap_err();
    let (status, code, _) = err_parts(&e);
    assert_eq!((status, code.as_str()), (404, "KeyNotFound"));
}

#[tokio::test]
async fn rbac_write_only_principal_can_set_but_not_get() {
    let f = fixture().await;
    let v = f.kv.vault(ESCROW_VAULT).unwrap();
    v.grant(WRITER, roles::ESCROW_SECRET_WRITER, Scope::Vault);
    let c = secret_client(
        &f,
        ESCROW_VAULT,
        LabCredential::new(WRITER),
        RetryOptions::none(),
    );
    sdk_set(&c, "vault-root-token", "s.escrowed")
        .await
        .expect("set is allowed");
    assert_eq!(
        v.secret_value("vault-root-token").as_deref(),
        Some("s.escrowed")
    );

    let e = sdk_get(&c, "vault-root-token").await.unwrap_err();
    let (status, code, body) = err_parts(&e);
    assert_eq!(status, 403);
    // Like the real service, the message holds "\r\n" (JSON escapes). azure_core 1.1 parses error bodies
    // into borrowed &str, which cannot hold escapes, so its error_code falls back to the status: read the
    // code from the body.
    assert_eq!(code, "403");
    let body: serde_json::Value = serde_json::from_str(&body).expect("KeyVaultError JSON");
    assert_eq!(body["error"]["code"], "Forbidden");
    assert_eq!(body["error"]["innererror"]["code"], "ForbiddenByRbac");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with("Caller is not authorized to perform action on resource."));
    assert!(msg.contains(actions::SECRETS_GET), "{msg}");
    assert!(!msg.contains("s.escrowed"), "no secret value in errors");

    // A principal with no assignment cannot even write.
    let c = secret_client(
        &f,
        ESCROW_VAULT,
        LabCredential::new(NOBODY),
        RetryOptions::none(),
    );
    let e = sdk_set(&c, "other", "x").await.unwrap_err();
    assert_eq!(err_parts(&e).0, 403);
    assert_eq!(v.secret_value("other"), None);
}

#[tokio::test]
async fn rbac_wrap_only_principal_can_wrap_but_not_unwrap() {
    let f = fixture().await;
    let v = f.kv.vault(ESCROW_VAULT).unwrap();
    v.create_key(ESCROW_KEY, 2048).unwrap();
    v.create_key("other-key", 2048).unwrap();
    v.grant(
        WRITER,
        roles::ESCROW_KEY_WRAPPER,
        Scope::Key(ESCROW_KEY.into()),
    );
    let c = key_client(&f, ESCROW_VAULT, LabCredential::new(WRITER));
    let wrapped = c
        .wrap_key(ESCROW_KEY, oaep256(vec![7; 32]).try_into().unwrap(), None)
        .await
        .expect("wrap is allowed")
        .into_model()
        .unwrap();
    let version = wrapped.resource_id().unwrap().version.unwrap();
    let e = c
        .unwrap_key(
            ESCROW_KEY,
            &version,
            oaep256(wrapped.result.unwrap()).try_into().unwrap(),
            None,
        )
        .await
        .unwrap_err();
    let (status, _, body) = err_parts(&e);
    assert_eq!(status, 403);
    assert!(body.contains("ForbiddenByRbac") && body.contains(actions::KEYS_UNWRAP));
    // The assignment is scoped to the escrow key: another key is off limits, and so is reading the key.
    let e = c
        .wrap_key("other-key", oaep256(vec![7; 32]).try_into().unwrap(), None)
        .await
        .unwrap_err();
    assert_eq!(err_parts(&e).0, 403);
    let e = c.get_key(ESCROW_KEY, None).await.unwrap_err();
    assert_eq!(err_parts(&e).0, 403);
}

#[tokio::test]
async fn rbac_secret_prefix_scope() {
    let f = fixture().await;
    let v = f.kv.vault(SHARED_VAULT).unwrap();
    v.set_secret("consul-gossip", "gossip").unwrap();
    v.set_secret("vault-unseal", "nope").unwrap();
    v.grant(
        READER,
        roles::SECRETS_USER,
        Scope::SecretPrefix("consul-".into()),
    );
    let c = secret_client(
        &f,
        SHARED_VAULT,
        LabCredential::new(READER),
        RetryOptions::none(),
    );
    assert_eq!(sdk_get(&c, "consul-gossip").await.unwrap(), "gossip");
    let e = sdk_get(&c, "vault-unseal").await.unwrap_err();
    assert_eq!(err_parts(&e).0, 403);
    // Secrets User has no setSecret.
    let e = sdk_set(&c, "consul-gossip", "overwrite").await.unwrap_err();
    assert_eq!(err_parts(&e).0, 403);
    assert_eq!(v.secret_version_count("consul-gossip"), 1);
}

#[tokio::test]
async fn no_token_gets_the_key_vault_challenge() {
    let f = fixture().await;
    let url = f.kv.vault(SHARED_VAULT).unwrap().url();
    let r = f
        .http
        .get(format!("{url}secrets/x?api-version=2025-07-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"].to_str().unwrap(),
        format!(
            "Bearer authorization=\"https://login.microsoftonline.com/{LAB_TENANT}\", resource=\"https://vault.azure.net\""
        )
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "Unauthorized");

    // Missing or unknown api-version: 400 BadParameter.
    let r = f.http.get(format!("{url}secrets/x")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = f
        .http
        .get(format!("{url}secrets/x?api-version=1999-01-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // With the SDK's default verify_challenge_resource, a vault on 127.0.0.1 is refused by the SDK
    // itself (the challenge names vault.azure.net): the lab must set it to false.
    f.kv.vault(SHARED_VAULT)
        .unwrap()
        .grant(READER, roles::SECRETS_USER, Scope::Vault);
    let strict = SecretClient::new(
        &url,
        LabCredential::new(READER),
        Some(SecretClientOptions {
            client_options: client_options(&f.http, RetryOptions::none()),
            ..Default::default()
        }),
    )
    .unwrap();
    let e = sdk_get(&strict, "x").await.unwrap_err();
    assert!(e.to_string().contains("verify_challenge_resource"), "{e}");
}

#[tokio::test]
async fn bad_tokens_get_401() {
    let f = fixture().await;
    let v = f.kv.vault(SHARED_VAULT).unwrap();
    v.grant(READER, roles::ADMINISTRATOR, Scope::Vault);
    v.set_secret("s", "v").unwrap();

    // Expired: the SDK re-fetches once on 401, gets another expired token, and surfaces the 401.
    let cred = LabCredential::with_ttl(READER, -600);
    let c = secret_client(&f, SHARED_VAULT, cred.clone(), quick_retries());
    let e = sdk_get(&c, "s").await.unwrap_err();
    let (status, code, body) = err_parts(&e);
    assert_eq!((status, code.as_str()), (401, "Unauthorized"), "{body}");
    assert!(body.contains("expired"), "{body}");
    // One token: the challenge round trip came first, and a 401 after it is final.
    assert_eq!(cred.calls.load(Ordering::SeqCst), 1);
    // The same principal with a valid token reads fine.
    let c = secret_client(
        &f,
        SHARED_VAULT,
        LabCredential::new(READER),
        RetryOptions::none(),
    );
    assert_eq!(sdk_get(&c, "s").await.unwrap(), "v");

    // Raw requests: wrong audience, future nbf, foreign issuer, no oid, garbage.
    let url = v.url();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let b64 = |v: serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let jwt = |claims: serde_json::Value| {
        format!(
            "{}.{}.sig",
            b64(serde_json::json!({"alg": "RS256"})),
            b64(claims)
        )
    };
    let good = serde_json::json!({
        "aud": "https://vault.azure.net/", "iss": format!("https://sts.windows.net/{LAB_TENANT}/"),
        "nbf": now - 60, "exp": now + 600, "oid": READER,
    });
    let with = |k: &str, val: serde_json::Value| {
        let mut c = good.clone();
        if val.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = val;
        }
        jwt(c)
    };
    let cases = [
        ("trailing-slash audience is fine", jwt(good.clone()), 200),
        (
            "storage audience",
            lab_token_for("https://storage.azure.com", READER, now, 600),
            401,
        ),
        ("future nbf", with("nbf", (now + 300).into()), 401),
        ("expired", with("exp", (now - 1).into()), 401),
        (
            "foreign issuer",
            with("iss", "https://evil.example/".into()),
            401,
        ),
        ("no oid", with("oid", serde_json::Value::Null), 401),
        ("not a JWT", "garbage".to_string(), 401),
    ];
    for (what, token, want) in cases {
        let r = f
            .http
            .get(format!("{url}secrets/s?api-version=7.6"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{what}");
        if want == 401 {
            assert!(r.headers().contains_key("www-authenticate"), "{what}");
        }
    }
}

#[tokio::test]
async fn injected_500_is_retried_by_the_sdk_then_succeeds() {
    let f = fixture().await;
    let v = f.kv.vault(SHARED_VAULT).unwrap();
    v.grant(READER, roles::SECRETS_USER, Scope::Vault);
    v.set_secret("gossip", "k").unwrap();
    let c = secret_client(
        &f,
        SHARED_VAULT,
        LabCredential::new(READER),
        quick_retries(),
    );
    // Warm up the challenge so the fault hits the authenticated request.
    assert_eq!(sdk_get(&c, "gossip").await.unwrap(), "k");
    v.clear_served();
    v.inject(Fault::status(Op::GetSecret, 500).times(2));
    assert_eq!(sdk_get(&c, "gossip").await.unwrap(), "k");
    let statuses: Vec<u16> = v.served().iter().map(|s| s.status).collect();
    assert_eq!(statuses, vec![500, 500, 200]);
    assert!(v.faults().is_empty(), "a times(n) fault disarms itself");

    // Without retries the error surfaces with its status and code.
    let c = secret_client(
        &f,
        SHARED_VAULT,
        LabCredential::new(READER),
        RetryOptions::none(),
    );
    v.inject(Fault::status(Op::GetSecret, 500).times(1));
    let e = sdk_get(&c, "gossip").await.unwrap_err();
    let (status, code, _) = err_parts(&e);
    assert_eq!((status, code.as_str()), (500, "InternalServerError"));
    assert_eq!(sdk_get(&c, "gossip").await.unwrap(), "k");

    // Faults are per operation: a SetSecret fault leaves reads alone; until cleared it stays.
    v.inject(Fault::status(Op::SetSecret, 503));
    assert_eq!(sdk_get(&c, "gossip").await.unwrap(), "k");
    v.grant(READER, roles::CLUSTER_MATERIAL_WRITER, Scope::Vault);
    for _ in 0..3 {
        let e = sdk_set(&c, "gossip", "new").await.unwrap_err();
        assert_eq!(err_parts(&e).0, 503);
    }
    v.clear_faults();
    sdk_set(&c, "gossip", "new").await.expect("set after clear");

    // 429 carries Retry-After, and an injected 403 looks like an RBAC denial.
    v.inject(Fault::status(None, 429).times(1));
    v.inject(Fault::status(None, 403).times(1));
    let e = sdk_get(&c, "gossip").await.unwrap_err();
    let (status, code, _) = err_parts(&e);
    assert_eq!((status, code.as_str()), (429, "Throttled"));
    let e = sdk_get(&c, "gossip").await.unwrap_err();
    let (status, _, body) = err_parts(&e);
    assert!(status == 403 && body.contains("ForbiddenByRbac"), "{body}");
    assert_eq!(sdk_get(&c, "gossip").await.unwrap(), "new");
}

/// The service limit (off by default): under it every request is served; over it the vault answers 429
/// `Throttled` with a `Retry-After` the agent reads; 429s do not count; each vault counts alone; once the window
/// has slid past, the vault serves again. A 2 s window with a limit of 3 stands for Azure's 4,000 per 10 s.
#[tokio::test]
async fn throttle_429_with_retry_after_per_vault_then_served_again() {
    let f = fixture().await;
    let v = f.kv.vault(SHARED_VAULT).unwrap();
    let other = f.kv.vault(STATUS_VAULT).unwrap();
    for vault in [v, other] {
        vault.grant(READER, roles::SECRETS_USER, Scope::Vault);
        vault.set_secret("gossip", "k").unwrap();
    }
    let c = secret_client(
        &f,
        SHARED_VAULT,
        LabCredential::new(READER),
        RetryOptions::none(),
    );
    let c_other = secret_client(
        &f,
        STATUS_VAULT,
        LabCredential::new(READER),
        RetryOptions::none(),
    );
    // Off by default: many more requests than the limit below, all served.
    assert_eq!(v.throttle_limit(), None);
    for _ in 0..8 {
        assert_eq!(sdk_get(&c, "gossip").await.unwrap(), "k");
    }
    let limit = Throttle {
        limit: 3,
        window: Duration::from_secs(2),
    };
    f.kv.throttle(Some(limit));
    assert_eq!(v.throttle_limit(), Some(limit));
    v.clear_served();
    // Under the limit: served.
    for _ in 0..3 {
        assert_eq!(sdk_get(&c, "gossip").await.unwrap(), "k");
    }
    // Over it: 429 Throttled with Retry-After (whole seconds, within the window), as the agent reads it.
    for _ in 0..2 {
        let e = sdk_get(&c, "gossip").await.unwrap_err();
        let (status, code, _) = err_parts(&e);
        assert_eq!((status, code.as_str()), (429, "Throttled"));
        let after = hashistack_agent::azure::retry_after(&e).expect("Retry-After");
        assert!(
            after >= Duration::from_secs(1) && after <= Duration::from_secs(2),
            "{after:?}"
        );
    }
    let served = v.served();
    let statuses: Vec<u16> = served.iter().map(|s| s.status).collect();
    assert_eq!(statuses, vec![200, 200, 200, 429, 429]);
    assert!(served[3].retry_after.is_some_and(|s| (1..=2).contains(&s)));
    assert_eq!(served[0].retry_after, None);
    // Another vault of the same double counts its own transactions.
    assert_eq!(sdk_get(&c_other, "gossip").await.unwrap(), "k");
    // After the window (the 429s did not count), served again, up to the limit.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for _ in 0..3 {
        assert_eq!(sdk_get(&c, "gossip").await.unwrap(), "k");
    }
    assert_eq!(err_parts(&sdk_get(&c, "gossip").await.unwrap_err()).0, 429);
    // Off again: served at once.
    f.kv.throttle(None);
    assert_eq!(sdk_get(&c, "gossip").await.unwrap(), "k");
}

#[tokio::test]
async fn injected_delay_and_reset() {
    let f = fixture().await;
    let v = f.kv.vault(ESCROW_VAULT).unwrap();
    v.create_key(ESCROW_KEY, 2048).unwrap();
    v.grant(WRITER, roles::ESCROW_KEY_WRAPPER, Scope::Vault);
    let c = key_client(&f, ESCROW_VAULT, LabCredential::new(WRITER));
    let wrap = || c.wrap_key(ESCROW_KEY, oaep256(vec![1; 32]).try_into().unwrap(), None);
    wrap().await.expect("warm up");

    // A delay longer than the caller's deadline makes the caller time out.
    v.inject(Fault::delay(Op::WrapKey, Duration::from_secs(3)).times(1));
    let t = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_millis(500), wrap()).await;
    assert!(r.is_err(), "the deadline fires first");
    assert!(t.elapsed() < Duration::from_secs(2));
    // A short delay only slows the answer down.
    v.inject(Fault::delay(None, Duration::from_millis(300)).times(1));
    let t = std::time::Instant::now();
    wrap().await.expect("delayed wrap");
    assert!(t.elapsed() >= Duration::from_millis(300));

    // A reset is a transport error (no HTTP status at all). The HTTP client itself resends a request
    // whose connection closed without an answer, so a one-shot reset is invisible: reset until cleared.
    v.clear_served();
    v.inject(Fault::reset(Op::WrapKey));
    let e = wrap().await.unwrap_err();
    assert_eq!(err_parts(&e).0, 0, "{e}");
    assert!(v.served().iter().all(|s| s.status == 0));
    v.clear_faults();
    wrap().await.expect("next request is fine");

    // A stopped vault refuses connections.
    v.stop();
    let e = wrap().await.unwrap_err();
    assert_eq!(err_parts(&e).0, 0, "{e}");
}

#[tokio::test]
async fn fake_imds_tokens_carry_the_nodes_identity() {
    let f = fixture().await;
    let v = f.kv.vault(SHARED_VAULT).unwrap();
    v.grant(
        principals::CONSUL,
        roles::CLUSTER_MATERIAL_WRITER,
        Scope::Vault,
    );

    let serve_imds = |oid: &str| {
        let state = Arc::new(Mutex::new(ImdsState {
            oid: oid.into(),
            ..ImdsState::new(serde_json::json!({}))
        }));
        async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = l.local_addr().unwrap().port();
            tokio::spawn(async move {
                let _ = axum::serve(l, imds::router(state)).await;
            });
            format!("http://127.0.0.1:{port}")
        }
    };
    let credential = |endpoint: String| {
        let client = hashistack_agent::imds::ImdsClient::new(
            &endpoint,
            hashistack_agent::retry::RetryPolicy::imds(Duration::from_secs(5)),
        );
        Arc::new(hashistack_agent::identity::ImdsCredential::new(
            client, None,
        ))
    };
    // A Consul server's IMDS: its identity may write and read cluster material.
    let consul = secret_client(
        &f,
        SHARED_VAULT,
        credential(serve_imds(principals::CONSUL).await),
        RetryOptions::none(),
    );
    sdk_set(&consul, "nomad-gossip", "g")
        .await
        .expect("consul identity writes");
    assert_eq!(sdk_get(&consul, "nomad-gossip").await.unwrap(), "g");
    assert!(v
        .served()
        .iter()
        .any(|s| s.principal.as_deref() == Some(principals::CONSUL)));
    // A worker's IMDS: not assigned here, so 403.
    let worker = secret_client(
        &f,
        SHARED_VAULT,
        credential(serve_imds(principals::WORKERS).await),
        RetryOptions::none(),
    );
    let e = sdk_get(&worker, "nomad-gossip").await.unwrap_err();
    assert_eq!(err_parts(&e).0, 403);
    // The default IMDS state keeps the lab's historical oid.
    assert_eq!(ImdsState::new(serde_json::json!({})).oid, imds::DEFAULT_OID);
}

#[tokio::test]
async fn arm_model_matches_the_templates_assignments() {
    let f = fixture().await;
    f.kv.model_arm("lab").expect("model ARM");
    let escrow = |oid: &str| key_client(&f, ESCROW_VAULT, LabCredential::new(oid));
    let escrow_secrets = |oid: &str| {
        secret_client(
            &f,
            ESCROW_VAULT,
            LabCredential::new(oid),
            RetryOptions::none(),
        )
    };
    let shared = |oid: &str| {
        secret_client(
            &f,
            SHARED_VAULT,
            LabCredential::new(oid),
            RetryOptions::none(),
        )
    };

    // Server identity: escrow write-only to its own tier's escrow secret (single-secret scope), wrap-only;
    // shared read-write.
    let tiers = [
        (principals::CONSUL, "consul"),
        (principals::VAULT, "vault"),
        (principals::NOMAD, "nomad"),
    ];
    for (server, tier) in tiers {
        let own = hashistack_agent::escrow::tier_secret_name("lab", tier);
        assert_eq!(own, format!("lab-{tier}-escrow"));
        assert_eq!(
            f.kv.vault(ESCROW_VAULT).unwrap().secret_version_count(&own),
            1,
            "ARM creates {own} with a placeholder version"
        );
        sdk_set(&escrow_secrets(server), &own, "x")
            .await
            .expect("escrow write to the own tier's secret");
        let e = sdk_get(&escrow_secrets(server), &own).await.unwrap_err();
        assert_eq!(err_parts(&e).0, 403);
        for (_, other) in tiers.iter().filter(|(_, t)| *t != tier) {
            let e = sdk_set(
                &escrow_secrets(server),
                &hashistack_agent::escrow::tier_secret_name("lab", other),
                "forged",
            )
            .await
            .unwrap_err();
            assert_eq!(err_parts(&e).0, 403, "{tier} writes {other}'s escrow");
        }
        for name in [format!("{own}x"), format!("root-{}", &server[32..])] {
            let e = sdk_set(&escrow_secrets(server), &name, "x")
                .await
                .unwrap_err();
            assert_eq!(err_parts(&e).0, 403, "{tier} writes {name}");
        }
        sdk_set(&shared(server), "ca-cert", "pem")
            .await
            .expect("shared write");
    }
    let kc = escrow(principals::VAULT);
    let wrapped = kc
        .wrap_key(ESCROW_KEY, oaep256(vec![9; 32]).try_into().unwrap(), None)
        .await
        .expect("server wraps")
        .into_model()
        .unwrap();
    let ct = wrapped.result.clone().unwrap();
    assert_eq!(ct.len(), 384, "ARM's escrow key is RSA 3072");
    let e = kc
        .unwrap_key(
            ESCROW_KEY,
            "",
            oaep256(ct.clone()).try_into().unwrap(),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err_parts(&e).0, 403);
    // The operator reads escrow and unwraps.
    assert_eq!(
        sdk_get(&escrow_secrets(principals::OPERATOR), "lab-vault-escrow")
            .await
            .unwrap(),
        "x"
    );
    let out = escrow(principals::OPERATOR)
        .unwrap_key(ESCROW_KEY, "", oaep256(ct).try_into().unwrap(), None)
        .await
        .expect("operator unwraps")
        .into_model()
        .unwrap();
    assert_eq!(out.result.unwrap(), vec![9; 32]);
    // Workers read shared material but cannot write it, and see nothing in escrow.
    assert_eq!(
        sdk_get(&shared(principals::WORKERS), "ca-cert")
            .await
            .unwrap(),
        "pem"
    );
    let e = sdk_set(&shared(principals::WORKERS), "ca-cert", "evil")
        .await
        .unwrap_err();
    assert_eq!(err_parts(&e).0, 403);
    let e = sdk_get(&escrow_secrets(principals::WORKERS), "lab-vault-escrow")
        .await
        .unwrap_err();
    assert_eq!(err_parts(&e).0, 403);

    // The servers vault (CA key, Nomad gossip key): server identities only.
    let servers = |oid: &str| {
        secret_client(
            &f,
            SERVERS_VAULT,
            LabCredential::new(oid),
            RetryOptions::none(),
        )
    };
    for server in [principals::CONSUL, principals::VAULT, principals::NOMAD] {
        sdk_set(&servers(server), "ca-key", "key")
            .await
            .expect("servers write the servers vault");
        assert_eq!(sdk_get(&servers(server), "ca-key").await.unwrap(), "key");
    }
    for other in [
        principals::WORKERS,
        principals::JUMPBOX,
        principals::OPERATOR,
    ] {
        let e = sdk_get(&servers(other), "ca-key").await.unwrap_err();
        assert_eq!(err_parts(&e).0, 403, "{other} reads the CA key");
    }
    // The status vault (status tokens): servers set but cannot read back; only the jumpbox reads.
    let status = |oid: &str| {
        secret_client(
            &f,
            STATUS_VAULT,
            LabCredential::new(oid),
            RetryOptions::none(),
        )
    };
    for server in [principals::CONSUL, principals::VAULT, principals::NOMAD] {
        sdk_set(&status(server), "status-consul-token", "t")
            .await
            .expect("servers hand status tokens over");
        let e = sdk_get(&status(server), "status-consul-token")
            .await
            .unwrap_err();
        assert_eq!(err_parts(&e).0, 403, "{server} reads a status token back");
    }
    assert_eq!(
        sdk_get(&status(principals::JUMPBOX), "status-consul-token")
            .await
            .unwrap(),
        "t"
    );
    let e = sdk_get(&status(principals::WORKERS), "status-consul-token")
        .await
        .unwrap_err();
    assert_eq!(err_parts(&e).0, 403);
}

#[tokio::test]
async fn persisted_state_survives_a_restart_of_the_double() {
    let f = fixture().await;
    let file = f._dir.path().join("escrow.json");
    let kv = KeyVaultDouble::start(
        &f.cert_pem,
        &f.key_pem,
        &[spec(ESCROW_VAULT, Some(file.clone()))],
    )
    .await
    .unwrap();
    let v = kv.vault(ESCROW_VAULT).unwrap();
    let kid = v.create_key(ESCROW_KEY, 2048).unwrap();
    v.set_secret("recovery", "shares").unwrap();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let key_before = v.key_versions(ESCROW_KEY);
    drop(kv);

    let kv = KeyVaultDouble::start(&f.cert_pem, &f.key_pem, &[spec(ESCROW_VAULT, Some(file))])
        .await
        .unwrap();
    let v = kv.vault(ESCROW_VAULT).unwrap();
    assert_eq!(v.secret_value("recovery").as_deref(), Some("shares"));
    assert_eq!(v.key_versions(ESCROW_KEY), key_before);
    assert!(
        v.assignments().is_empty(),
        "role assignments are not persisted"
    );
    v.grant(READER, roles::CRYPTO_SERVICE_ENCRYPTION_USER, Scope::Vault);
    let options = KeyClientOptions {
        client_options: client_options(&f.http, RetryOptions::none()),
        verify_challenge_resource: Some(false),
        ..Default::default()
    };
    let c = KeyClient::new(&v.url(), LabCredential::new(READER), Some(options)).unwrap();
    let wrapped = c
        .wrap_key(
            ESCROW_KEY,
            oaep256(vec![5; 16]).try_into().unwrap(),
            Some(KeyClientWrapKeyOptions {
                key_version: Some(kid.rsplit('/').next().unwrap().into()),
                ..Default::default()
            }),
        )
        .await
        .unwrap()
        .into_model()
        .unwrap();
    let out = c
        .unwrap_key(
            ESCROW_KEY,
            "",
            oaep256(wrapped.result.unwrap()).try_into().unwrap(),
            None,
        )
        .await
        .unwrap()
        .into_model()
        .unwrap();
    assert_eq!(out.result.unwrap(), vec![5; 16]);
}

/// Why one port per vault and not `https://host:8443/<vault>/`: the SDK sends requests under a path
/// prefix fine, but its `ResourceId` parsing (`resource_id()` on keys, secrets and results) requires
/// `/keys/…` or `/secrets/…` right after the host, so ids from a prefixed vault do not parse.
#[test]
fn sdk_resource_ids_need_the_vault_at_the_root() {
    let ok: ResourceId = "https://127.0.0.1:8444/keys/escrow-wrap/0123"
        .parse()
        .unwrap();
    assert_eq!(ok.vault_url, "https://127.0.0.1:8444");
    assert!("https://127.0.0.1:8443/escrow/keys/escrow-wrap/0123"
        .parse::<ResourceId>()
        .is_err());
}
