//! The HTTP side of the double: the TLS accept loop, the documented routes (secrets and keys, an empty version
//! segment meaning "latest"), the api-version check, the request pipeline (route, api-version, authentication,
//! faults, name check, RBAC, then the operation) with its request log, and the KeyVaultError answer shape.

use super::auth::{authenticate, challenge};
use super::faults::{injected, take_faults, throttled, FaultAction};
use super::rbac::{authorize, Op};
use super::store::{
    attributes, b64url, find_key, find_secret, from_b64url, key_bundle, new_rsa_key, new_version,
    now, private_key, secret_bundle, KeyVersion, SecretVersion,
};
use super::{Served, Vault, VaultInner, VaultState, API_VERSION, API_VERSIONS};
use aws_lc_rs::rsa::{OaepPrivateDecryptingKey, OaepPublicEncryptingKey, OAEP_SHA256_MGF1SHA256};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::TlsAcceptor;

pub(super) async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: TlsAcceptor,
    inner: Arc<VaultInner>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // The client sends its first request on this connection after the server's handshake flight, which
        // follows the accept: a lower bound of when it was sent (`Served::sent_after`).
        let accepted = std::time::Instant::now();
        // As production front ends do: without it, hyper's answer (headers and body in separate TLS records)
        // waits on Nagle for the client's delayed ACK, ~40 ms on Linux, an artifact no real vault adds.
        let _ = tcp.set_nodelay(true);
        let (tls, inner) = (tls.clone(), inner.clone());
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await
            else {
                return;
            };
            let mut down = inner.down.subscribe();
            // HTTP/1.1 without pipelining: the next request on a connection is sent after the answer before it.
            static CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let id = CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let ready = Arc::new(std::sync::Mutex::new((id, accepted)));
            let svc =
                hyper::service::service_fn(move |req| handle(inner.clone(), ready.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = down.wait_for(|d| *d) => {}
            }
        });
    }
}

/// Returned by the service to make hyper drop the connection (the Reset fault).
#[derive(Debug)]
struct ResetConnection;
impl std::fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by fault injection")
    }
}
impl std::error::Error for ResetConnection {}

type Resp = Response<Full<Bytes>>;

/// An error answer in the KeyVaultError shape.
pub(super) struct KvErr {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) message: String,
    pub(super) inner: Option<&'static str>,
    /// `Retry-After` seconds of a 429 (1 when not set).
    pub(super) retry_after: Option<u64>,
}

impl KvErr {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        KvErr {
            status,
            code,
            message: message.into(),
            inner: None,
            retry_after: None,
        }
    }
    pub(super) fn bad(message: impl Into<String>) -> Self {
        KvErr::new(StatusCode::BAD_REQUEST, "BadParameter", message)
    }
    pub(super) fn unauthorized(message: impl Into<String>) -> Self {
        KvErr::new(StatusCode::UNAUTHORIZED, "Unauthorized", message)
    }
    pub(super) fn response(&self) -> Resp {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(inner) = self.inner {
            error["innererror"] = json!({"code": inner});
        }
        let mut r = json_response(self.status, &json!({ "error": error }));
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_str(&challenge()).expect("ascii"),
            );
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut().insert(
                RETRY_AFTER,
                HeaderValue::from(self.retry_after.unwrap_or(1)),
            );
        }
        r
    }
}

fn json_response(status: StatusCode, v: &Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    h.insert(
        "x-ms-request-id",
        HeaderValue::from_str(&uuid_like()).expect("ascii"),
    );
    r
}

fn uuid_like() -> String {
    let v = new_version();
    format!(
        "{}-{}-{}-{}-{}",
        &v[0..8],
        &v[8..12],
        &v[12..16],
        &v[16..20],
        &v[20..32]
    )
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The route of a request: operation, object name, optional version ("" = latest).
pub(super) struct Route {
    pub(super) op: Op,
    pub(super) name: String,
    pub(super) version: String,
}

fn route(method: &Method, path: &str) -> Result<Route, KvErr> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let r = |op: Op, name: &str, version: &str| {
        Ok(Route {
            op,
            name: name.to_string(),
            version: version.to_string(),
        })
    };
    let not_allowed = || {
        Err(KvErr::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("The requested resource does not support http method {method}."),
        ))
    };
    match segs.as_slice() {
        ["secrets", name] | ["secrets", name, ""] => match *method {
            Method::PUT => r(Op::SetSecret, name, ""),
            Method::GET => r(Op::GetSecret, name, ""),
            _ => not_allowed(),
        },
        ["secrets", name, "versions"] => match *method {
            Method::GET => r(Op::ListSecretVersions, name, ""),
            _ => not_allowed(),
        },
        ["secrets", name, version] => match *method {
            Method::GET => r(Op::GetSecret, name, version),
            _ => not_allowed(),
        },
        ["keys", name, "create"] => match *method {
            Method::POST => r(Op::CreateKey, name, ""),
            _ => not_allowed(),
        },
        ["keys", name, "versions"] => match *method {
            Method::GET => r(Op::ListKeyVersions, name, ""),
            _ => not_allowed(),
        },
        ["keys", name, op @ ("wrapkey" | "unwrapkey")]
        | ["keys", name, _, op @ ("wrapkey" | "unwrapkey")]
            if *method == Method::POST =>
        {
            let version = if segs.len() == 4 { segs[2] } else { "" };
            let op = if *op == "wrapkey" {
                Op::WrapKey
            } else {
                Op::UnwrapKey
            };
            r(op, name, version)
        }
        ["keys", name] | ["keys", name, ""] => match *method {
            Method::GET => r(Op::GetKey, name, ""),
            _ => not_allowed(),
        },
        ["keys", name, version] => match *method {
            Method::GET => r(Op::GetKey, name, version),
            _ => not_allowed(),
        },
        _ => Err(KvErr::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("The Key Vault double has no route for {method} {path}"),
        )),
    }
}

fn api_version(query: Option<&str>) -> Result<(), KvErr> {
    let v = query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "api-version")
        .map(|(_, v)| v);
    match v {
        None | Some("") => Err(KvErr::bad("The api-version query parameter is missing.")),
        Some(v) if API_VERSIONS.contains(&v) => Ok(()),
        Some(v) => Err(KvErr::bad(format!(
            "The specified version ({v}) is not recognized. Consider using the latest supported version ({API_VERSION})."
        ))),
    }
}

async fn handle(
    inner: Arc<VaultInner>,
    ready: Arc<std::sync::Mutex<(u64, std::time::Instant)>>,
    req: Request<Incoming>,
) -> Result<Resp, ResetConnection> {
    let (connection, sent_after) = *ready.lock().expect("connection clock");
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut served = Served {
        method: method.to_string(),
        path: path.clone(),
        op: None,
        status: 0,
        principal: None,
        at: std::time::Instant::now(),
        answered: std::time::Instant::now(),
        sent_after,
        connection,
        retry_after: None,
    };
    let result = serve(&inner, req, &mut served).await;
    served.answered = std::time::Instant::now();
    ready.lock().expect("connection clock").1 = served.answered;
    served.status = match &result {
        Ok(r) => r.status().as_u16(),
        Err(ResetConnection) => 0,
    };
    if let Ok(r) = &result {
        served.retry_after = r
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.parse().ok());
    }
    let mut st = inner.state.lock().expect("key vault double state");
    st.served.push(served);
    result
}

async fn serve(
    inner: &Arc<VaultInner>,
    req: Request<Incoming>,
    served: &mut Served,
) -> Result<Resp, ResetConnection> {
    let (parts, body) = req.into_parts();
    let route = match route(&parts.method, parts.uri.path()) {
        Ok(r) => r,
        Err(e) => return Ok(e.response()),
    };
    served.op = Some(route.op);
    if let Err(e) = api_version(parts.uri.query()) {
        return Ok(e.response());
    }
    let principal = match authenticate(parts.headers.get(AUTHORIZATION)) {
        Ok(p) => p,
        Err(e) => return Ok(e.response()),
    };
    served.principal = Some(principal.clone());
    // The service limit first: a throttled request costs the vault nothing more (and does not count).
    let admitted = inner.state.lock().expect("state").throttle.admit(served.at);
    if let Err(after) = admitted {
        return Ok(throttled(after).response());
    }
    let body = match Limited::new(body, 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(KvErr::bad("Request body too large or unreadable.").response()),
    };
    let (delay, terminal) = take_faults(&mut inner.state.lock().expect("state"), route.op);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match terminal {
        Some(FaultAction::Reset) => return Err(ResetConnection),
        Some(FaultAction::Status(s)) => return Ok(injected(s).response()),
        _ => {}
    }
    if !valid_name(&route.name) {
        return Ok(KvErr::bad(format!(
            "The request URI contains an invalid name: {}",
            route.name
        ))
        .response());
    }
    let vault = Vault {
        inner: inner.clone(),
    };
    // Key generation is slow-ish (RSA 3072: ~0.1–1 s): do it before taking the state lock.
    let new_key = if route.op == Op::CreateKey {
        if let Err(e) = authorize(&vault.state(), &inner.name, &principal, &route) {
            return Ok(e.response());
        }
        match create_params(&body) {
            Ok(k) => Some(k),
            Err(e) => return Ok(e.response()),
        }
    } else {
        None
    };
    let mut st = vault.state();
    if let Err(e) = authorize(&st, &inner.name, &principal, &route) {
        return Ok(e.response());
    }
    let result = execute(&vault, &mut st, &route, &body, new_key);
    Ok(match result {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => e.response(),
    })
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, KvErr> {
    serde_json::from_slice(body).map_err(|e| KvErr::bad(format!("Invalid request body: {e}")))
}

#[derive(Deserialize)]
struct AttributesIn {
    enabled: Option<bool>,
}

#[derive(Deserialize)]
struct SetSecretIn {
    value: Option<String>,
    #[serde(rename = "contentType")]
    content_type: Option<String>,
    tags: Option<BTreeMap<String, String>>,
    attributes: Option<AttributesIn>,
}

#[derive(Deserialize)]
struct CreateKeyIn {
    kty: Option<String>,
    key_size: Option<u32>,
    key_ops: Option<Vec<String>>,
    public_exponent: Option<u32>,
    tags: Option<BTreeMap<String, String>>,
    attributes: Option<AttributesIn>,
}

#[derive(Deserialize)]
struct KeyOpIn {
    alg: Option<String>,
    value: Option<String>,
}

fn create_params(body: &[u8]) -> Result<KeyVersion, KvErr> {
    let p: CreateKeyIn = parse_body(body)?;
    let kty = p.kty.unwrap_or_default();
    if kty != "RSA" && kty != "RSA-HSM" {
        return Err(KvErr::bad(format!(
            "The Key Vault double supports kty RSA and RSA-HSM only, not {kty}."
        )));
    }
    if p.public_exponent.is_some_and(|e| e != 65537) {
        return Err(KvErr::bad("Only public_exponent 65537 is supported."));
    }
    let mut k = new_rsa_key(&kty, p.key_size.unwrap_or(2048), p.key_ops, p.tags)?;
    if let Some(a) = p.attributes {
        k.enabled = a.enabled.unwrap_or(true);
    }
    Ok(k)
}

fn execute(
    vault: &Vault,
    st: &mut VaultState,
    route: &Route,
    body: &[u8],
    new_key: Option<KeyVersion>,
) -> Result<Value, KvErr> {
    let base = vault.inner.url.clone();
    let name = route.name.as_str();
    let persist = |st: &VaultState| {
        vault.persist(st).map_err(|e| {
            KvErr::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                format!("persisting the double's state: {e}"),
            )
        })
    };
    match route.op {
        Op::SetSecret => {
            let p: SetSecretIn = parse_body(body)?;
            let value = p
                .value
                .ok_or_else(|| KvErr::bad("The request body is missing the required 'value'."))?;
            let t = now();
            let sv = SecretVersion {
                version: new_version(),
                value,
                content_type: p.content_type,
                tags: p.tags,
                enabled: p.attributes.and_then(|a| a.enabled).unwrap_or(true),
                created: t,
                updated: t,
            };
            let out = secret_bundle(&base, name, &sv, true);
            st.store.secrets.entry(name.into()).or_default().push(sv);
            persist(st)?;
            Ok(out)
        }
        Op::GetSecret => {
            let s = find_secret(st, name, &route.version)?;
            if !s.enabled {
                return Err(KvErr {
                    inner: Some("SecretDisabled"),
                    ..KvErr::new(
                        StatusCode::FORBIDDEN,
                        "Forbidden",
                        "Operation get is not allowed on a disabled secret.",
                    )
                });
            }
            Ok(secret_bundle(&base, name, s, true))
        }
        Op::ListSecretVersions => {
            let list: Vec<Value> = st
                .store
                .secrets
                .get(name)
                .map(|v| {
                    v.iter()
                        .map(|s| secret_bundle(&base, name, s, false))
                        .collect()
                })
                .unwrap_or_default();
            Ok(json!({"value": list, "nextLink": null}))
        }
        Op::CreateKey => {
            let k = new_key.expect("create_params ran");
            let out = key_bundle(&base, name, &k)?;
            st.store.keys.entry(name.into()).or_default().push(k);
            persist(st)?;
            Ok(out)
        }
        Op::GetKey => key_bundle(&base, name, find_key(st, name, &route.version)?),
        Op::ListKeyVersions => {
            let list: Vec<Value> = st
                .store
                .keys
                .get(name)
                .map(|v| {
                    v.iter()
                        .map(|k| {
                            json!({
                                "kid": format!("{base}/keys/{name}/{}", k.version),
                                "attributes": attributes(k.enabled, k.created, k.updated),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok(json!({"value": list, "nextLink": null}))
        }
        Op::WrapKey | Op::UnwrapKey => {
            let p: KeyOpIn = parse_body(body)?;
            let alg = p.alg.unwrap_or_default();
            if alg != "RSA-OAEP-256" {
                return Err(KvErr::bad(format!(
                    "The Key Vault double supports alg RSA-OAEP-256 only, not {alg}."
                )));
            }
            let input = p
                .value
                .as_deref()
                .and_then(from_b64url)
                .ok_or_else(|| KvErr::bad("'value' is missing or not base64url."))?;
            let k = find_key(st, name, &route.version)?;
            let wrap = route.op == Op::WrapKey;
            let op_name = if wrap { "wrapKey" } else { "unwrapKey" };
            if !k.enabled {
                return Err(KvErr::new(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    format!("Operation {op_name} is not allowed on a disabled key."),
                ));
            }
            if !k.key_ops.iter().any(|o| o == op_name) {
                return Err(KvErr::bad(format!(
                    "Operation {op_name} is not permitted on this key."
                )));
            }
            let private = private_key(k)?;
            let output = if wrap {
                let public = OaepPublicEncryptingKey::new(private.public_key())
                    .map_err(|_| KvErr::bad("Key is not usable for RSA-OAEP-256."))?;
                let mut out = vec![0u8; public.ciphertext_size()];
                let n = public
                    .encrypt(&OAEP_SHA256_MGF1SHA256, &input, &mut out, None)
                    .map_err(|_| {
                        KvErr::bad(format!(
                            "The value is too long to wrap with this key (at most {} bytes).",
                            public.max_plaintext_size(&OAEP_SHA256_MGF1SHA256)
                        ))
                    })?
                    .len();
                out.truncate(n);
                out
            } else {
                let private = OaepPrivateDecryptingKey::new(private)
                    .map_err(|_| KvErr::bad("Key is not usable for RSA-OAEP-256."))?;
                let mut out = vec![0u8; private.min_output_size()];
                let n = private
                    .decrypt(&OAEP_SHA256_MGF1SHA256, &input, &mut out, None)
                    .map_err(|_| {
                        KvErr::bad("The ciphertext could not be unwrapped with this key.")
                    })?
                    .len();
                out.truncate(n);
                out
            };
            Ok(json!({
                "kid": format!("{base}/keys/{name}/{}", k.version),
                "value": b64url(&output),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_the_sdk_paths() {
        let r = route(&Method::POST, "/keys/k//wrapkey").ok().unwrap();
        assert_eq!(
            (r.op, r.name.as_str(), r.version.as_str()),
            (Op::WrapKey, "k", "")
        );
        let r = route(&Method::POST, "/keys/k/abc/unwrapkey").ok().unwrap();
        assert_eq!((r.op, r.version.as_str()), (Op::UnwrapKey, "abc"));
        let r = route(&Method::GET, "/secrets/s/").ok().unwrap();
        assert_eq!((r.op, r.version.as_str()), (Op::GetSecret, ""));
        let r = route(&Method::GET, "/secrets/s/versions").ok().unwrap();
        assert_eq!(r.op, Op::ListSecretVersions);
        assert!(route(&Method::DELETE, "/secrets/s").is_err());
        assert!(route(&Method::GET, "/certificates/c").is_err());
    }
}
