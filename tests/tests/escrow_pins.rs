//! Escrow receipts pin versions (issue 12, item 7), end to end against real Azurite and the Key Vault contract
//! double, with no cluster: a tier identity escrows as the bootstrap does (wrap, seal, blob, Key Vault, receipts in
//! the tier state); then a hostile holder of the same write permissions writes a forged, perfectly valid newer
//! escrow to both targets. `escrow open` must still return the pinned secrets and warn; `escrow verify` must flag
//! the replaced blob; a fresh escrow name that already exists is a conflict, never our upload; a copy that fails
//! to decrypt falls back to the other target; `--out` never replaces a file.
//!
//! Nets 150-153.

use hashistack_agent::azure::Azure;
use hashistack_agent::coordination::{self, TierPhase, TierState};
use hashistack_agent::escrow::{self, envelope, Receipt, ReceiptTarget, Targets, UploadError};
use hashistack_agent::retry::RetryPolicy;
use hashistack_e2e::{escrow_cmd, options, tools};
use hashistack_lab::keyvault::{principals, ESCROW_VAULT};
use hashistack_lab::Lab;
use std::sync::Arc;
use std::time::Duration;

const TIER: &str = "vault";

async fn bare_lab(name: &str, net: u8) -> Lab {
    let mut o = options(name, net);
    o.consul_servers = 0;
    o.vault_servers = 0;
    o.jumpbox = Some(false);
    o.bootstrap = false;
    o.start_agents = false;
    Lab::up(o, tools())
        .await
        .unwrap_or_else(|e| panic!("lab up: {e}"))
}

/// The Azure clients as the identity behind the fake IMDS `imds`.
fn azure_as(lab: &Lab, imds: &str) -> Azure {
    let client =
        hashistack_agent::imds::ImdsClient::new(imds, RetryPolicy::imds(Duration::from_secs(30)));
    let cred = hashistack_agent::identity::ImdsCredential::new(client, None);
    Azure::new(Arc::new(cred), Some(&lab.ca_cert), false).expect("azure clients")
}

fn targets(lab: &Lab) -> Targets {
    Targets {
        blob_endpoint: lab.blob_endpoint(),
        escrow_vault_uri: lab.escrow_vault_uri(),
    }
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        deadline: Duration::from_secs(30),
        attempt_timeout: Duration::from_secs(10),
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(2),
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Seals `secret` as tier `TIER`'s escrow `escrow_id` with a data key wrapped by the escrow key (as any tier
/// identity can: wrapping is what VMs may do).
async fn sealed(az: &Azure, t: &Targets, escrow_id: &str, secret: &str) -> envelope::Envelope {
    let p = escrow::prepare(az, t, policy())
        .await
        .expect("wrap a data key");
    envelope::seal(
        &p.key,
        escrow::payload(&serde_json::json!({ "root_token": secret })),
        escrow_id,
        "lab",
        TIER,
        &p.kek_id,
        &p.wrapped,
        now(),
    )
    .expect("seal")
}

async fn save_state(lab: &Lab, escrow_id: &str, receipts: Vec<Receipt>) {
    let mut st = TierState::new("lab", TIER, "lab-vault-0");
    st.escrow_id = Some(escrow_id.into());
    st.receipts = receipts;
    st.set(TierPhase::Done, "lab-vault-0", None);
    lab.write_blob(
        "coordination",
        &coordination::state_blob_name("lab", TIER),
        serde_json::to_vec(&st).unwrap(),
    )
    .await
    .expect("write the tier state");
}

/// Escrows `secret` to both targets as the bootstrap does, and records the receipts in the tier state.
async fn escrow_both(
    lab: &Lab,
    az: &Azure,
    escrow_id: &str,
    secret: &str,
) -> (envelope::Envelope, Vec<Receipt>) {
    let t = targets(lab);
    let env = sealed(az, &t, escrow_id, secret).await;
    let blob = escrow::upload_blob(az, &t, &env, policy())
        .await
        .expect("blob escrow");
    let kv = escrow::upload_keyvault(az, &t, &env, policy())
        .await
        .expect("key vault escrow");
    let receipts = vec![blob, kv];
    save_state(lab, escrow_id, receipts.clone()).await;
    (env, receipts)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn open_returns_the_pinned_versions_and_warns_about_newer_forged_ones() {
    let mut lab = bare_lab("escrow-pins", 150).await;
    let vm = lab
        .identity_imds("vault-node", 240, principals::VAULT)
        .await
        .unwrap();
    let operator = lab.operator_imds().await.unwrap();
    let az = azure_as(&lab, &vm);
    let t = targets(&lab);
    let (_env, receipts) = escrow_both(
        &lab,
        &az,
        "1700000000-00000000000000aa",
        "the-real-root-token",
    )
    .await;

    // The receipts pin what was written: the Key Vault version setSecret answered, the blob's ETag (Azurite keeps
    // no versions, so no x-ms-version-id is answered there; on Azure the version id is recorded too).
    let kv_receipt = receipts
        .iter()
        .find(|r| r.target == ReceiptTarget::Keyvault)
        .unwrap();
    let blob_receipt = receipts
        .iter()
        .find(|r| r.target == ReceiptTarget::Blob)
        .unwrap();
    let kv = lab.keyvault.as_ref().unwrap().vault(ESCROW_VAULT).unwrap();
    assert_eq!(kv_receipt.object, "lab-vault-escrow");
    assert_eq!(kv_receipt.version.len(), 32, "{kv_receipt:?}");
    assert!(blob_receipt.etag.is_some(), "{blob_receipt:?}");
    assert_eq!(
        blob_receipt.escrow_id.as_deref(),
        Some("1700000000-00000000000000aa")
    );

    // A hostile holder of the tier's write permissions (the same identity) writes a valid forged escrow with the
    // same escrow id, cluster and tier: a newer Key Vault version and a replaced blob.
    tokio::time::sleep(Duration::from_millis(1100)).await; // Key Vault creation times are whole seconds.
    let forged = sealed(&az, &t, "1700000000-00000000000000aa", "FORGED-root-token").await;
    // (The identity's setSecret on its own tier's secret is allowed: lab/tests/keyvault.rs proves it; the double's
    // admin write stands in for it here.)
    let forged_version = kv
        .set_secret_typed(
            "lab-vault-escrow",
            &String::from_utf8(forged.to_json()).unwrap(),
            Some(escrow::ESCROW_CONTENT_TYPE),
        )
        .unwrap();
    let blob_name = blob_receipt.object.strip_prefix("escrow/").unwrap();
    lab.write_blob("escrow", blob_name, forged.to_json())
        .await
        .unwrap();
    assert_eq!(
        kv.secret_version_count("lab-vault-escrow"),
        3,
        "the template's placeholder, the escrow, the forgery"
    );

    let o = escrow_cmd(&lab, &operator, &["open", "--tier", TIER]);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "escrow open: {err}");
    assert!(
        out.contains("the-real-root-token"),
        "the pinned escrow is opened: {out}"
    );
    assert!(!out.contains("FORGED"), "{out}");
    assert!(err.contains("WARNING"), "{err}");
    assert!(
        err.contains("lab-vault-escrow has 1 version(s) newer than the pinned"),
        "{err}"
    );
    assert!(
        err.contains(&forged_version),
        "the warning names the forged version: {err}"
    );
    assert!(err.contains("was written again after the escrow"), "{err}");
    assert!(
        err.contains("opened from its pinned keyvault copy"),
        "{err}"
    );

    // verify: the replaced blob is BAD (Azurite cannot serve the pinned content any more), the Key Vault copy is
    // intact and its newer version is a WARN line; exit 1.
    let o = escrow_cmd(&lab, &operator, &["verify"]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}\n{}", text(&o.stderr));
    let line = |prefix: &str, target: &str| {
        out.lines()
            .find(|l| l.starts_with(prefix) && l.contains(&format!(" {target} ")))
            .unwrap_or_else(|| panic!("no {prefix} {target} line in:\n{out}"))
            .to_string()
    };
    assert!(
        line("BAD", "blob").contains("no longer holds the pinned content"),
        "{out}"
    );
    assert!(line("ok", "keyvault").contains("pinned version"), "{out}");
    assert!(
        line("WARN", "keyvault").contains("newer than the pinned"),
        "{out}"
    );
    lab.down().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_existing_escrow_name_is_a_conflict_never_our_upload() {
    let mut lab = bare_lab("escrow-conflict", 151).await;
    let vm = lab
        .identity_imds("vault-node", 240, principals::VAULT)
        .await
        .unwrap();
    let az = azure_as(&lab, &vm);
    let t = targets(&lab);
    let id = "1700000000-00000000000000bb";
    let ours = sealed(&az, &t, id, "ours").await;
    let theirs = sealed(&az, &t, id, "theirs").await;

    // The escrow id is published in the tier state before the upload: the name it used to determine
    // (`<cluster>/<tier>/<escrow id>.json`) can be planted by anyone who reads the state. Our upload must not be
    // fooled into a receipt for it.
    lab.write_blob("escrow", &format!("lab/{TIER}/{id}.json"), theirs.to_json())
        .await
        .unwrap();
    let r = escrow::upload_blob(&az, &t, &ours, policy())
        .await
        .expect("upload");
    let stored = lab
        .read_blob("escrow", r.object.strip_prefix("escrow/").unwrap())
        .await
        .expect("the receipt's object exists");
    let stored: envelope::Envelope = serde_json::from_slice(&stored).unwrap();
    assert_eq!(
        stored.ciphertext_sha256(),
        ours.ciphertext_sha256(),
        "receipt {r:?} names our own object"
    );
    assert_eq!(r.ciphertext_sha256, ours.ciphertext_sha256());

    // A fresh attempt name that already exists is reported as a conflict, not taken as our own upload.
    lab.write_blob(
        "escrow",
        &escrow::blob_name(&ours, "0123456789abcdef"),
        theirs.to_json(),
    )
    .await
    .unwrap();
    let e = escrow::upload_blob_with(&az, &t, &ours, policy(), || "0123456789abcdef".to_string())
        .await
        .unwrap_err();
    assert!(matches!(e, UploadError::Conflict { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("already exists and was not written by this upload"),
        "{e}"
    );
    lab.down().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_that_fails_to_decrypt_falls_back_to_the_other_target() {
    let mut lab = bare_lab("escrow-fallback", 152).await;
    let vm = lab
        .identity_imds("vault-node", 240, principals::VAULT)
        .await
        .unwrap();
    let operator = lab.operator_imds().await.unwrap();
    let az = azure_as(&lab, &vm);
    let t = targets(&lab);
    let id = "1700000000-00000000000000cc";
    let env = sealed(&az, &t, id, "fallback-root-token").await;
    // The blob copy's data key is damaged (its ciphertext, and so the receipt's hash, unchanged): it cannot be
    // decrypted. The Key Vault copy is intact.
    let mut damaged = env.clone();
    let other = sealed(&az, &t, id, "x").await;
    damaged.wrapped_key = other.wrapped_key.clone();
    let blob = escrow::upload_blob(&az, &t, &damaged, policy())
        .await
        .unwrap();
    let kv = escrow::upload_keyvault(&az, &t, &env, policy())
        .await
        .unwrap();
    save_state(&lab, id, vec![blob, kv]).await;

    let o = escrow_cmd(&lab, &operator, &["open", "--tier", TIER]);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "escrow open: {err}");
    assert!(out.contains("fallback-root-token"), "{out}");
    assert!(err.contains("the blob copy"), "{err}");
    assert!(err.contains("could not be used"), "{err}");
    assert!(
        err.contains("opened from its pinned keyvault copy"),
        "{err}"
    );

    // A copy of another tier or escrow id is refused even when its hash matches the receipt.
    let mut wrong_tier = env.clone();
    wrong_tier.tier = "consul".into();
    let blob = escrow::upload_blob(&az, &t, &wrong_tier, policy())
        .await
        .unwrap();
    save_state(&lab, id, vec![blob]).await;
    let o = escrow_cmd(&lab, &operator, &["open", "--tier", TIER]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("tier \"consul\"'s escrow, not \"vault\"'s"),
        "{err}"
    );
    lab.down().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn open_out_never_replaces_a_file() {
    let mut lab = bare_lab("escrow-out", 153).await;
    let vm = lab
        .identity_imds("vault-node", 240, principals::VAULT)
        .await
        .unwrap();
    let operator = lab.operator_imds().await.unwrap();
    let az = azure_as(&lab, &vm);
    escrow_both(&lab, &az, "1700000000-00000000000000dd", "out-root-token").await;

    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("existing.json");
    std::fs::write(&existing, b"operator notes").unwrap();
    let o = escrow_cmd(
        &lab,
        &operator,
        &["open", "--tier", TIER, "--out", existing.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("already exists"),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(std::fs::read(&existing).unwrap(), b"operator notes");

    let fresh = dir.path().join("fresh.json");
    let o = escrow_cmd(
        &lab,
        &operator,
        &["open", "--tier", TIER, "--out", fresh.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(text(&std::fs::read(&fresh).unwrap()).contains("out-root-token"));
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 2, "no temp file left: {names:?}");
    lab.down().await;
}
