//! A fake Azure IMDS per node: the instance document (with the node's tags, as a scale set would give
//! them) and managed-identity tokens shaped the way Azurite checks them (iss, aud, nbf, iat, exp).
//! Like the real service it requires `Metadata: true` and refuses proxied requests.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

pub const LAB_TENANT: &str = "00000000-0000-4000-8000-00000000a2b0";
/// The `oid` of tokens when a node's identity is not set (the lab's historical value).
pub const DEFAULT_OID: &str = "00000000-0000-4000-8000-00000000beef";

/// What one fake IMDS serves; mutable so tests can change a node's tags or break its answers.
#[derive(Debug, Clone)]
pub struct ImdsState {
    pub document: Value,
    /// Answer every request with this status instead (fault injection).
    pub fail_with: Option<u16>,
    /// The managed identity's object id: the `oid` claim of the tokens this IMDS issues (the principal the
    /// Key Vault double's RBAC checks). [`DEFAULT_OID`] unless the lab sets a role's identity.
    pub oid: String,
    /// The scale set's `userData`, as Azure serves it (base64 text; empty when none is set).
    pub user_data: String,
}

impl ImdsState {
    pub fn new(document: Value) -> Self {
        ImdsState {
            document,
            fail_with: None,
            oid: DEFAULT_OID.into(),
            user_data: String::new(),
        }
    }
}

pub type Shared = Arc<Mutex<ImdsState>>;

/// An Azure-shaped instance document.
pub fn instance_document(
    name: &str,
    scale_set: &str,
    ip: &str,
    tags: &[(String, String)],
) -> Value {
    let tags_list: Vec<Value> = tags
        .iter()
        .map(|(n, v)| json!({"name": n, "value": v}))
        .collect();
    let tags_str = tags
        .iter()
        .map(|(n, v)| format!("{n}:{v}"))
        .collect::<Vec<_>>()
        .join(";");
    let vm_id = format!("{:0>8}-0000-4000-8000-{:0>12}", hex_of(name), hex_of(ip));
    json!({
        "compute": {
            "azEnvironment": "AzurePublicCloud",
            "location": "lab",
            "name": name,
            "osProfile": {"adminUsername": "azureuser", "computerName": name, "disablePasswordAuthentication": "true"},
            "osType": "Linux",
            "resourceGroupName": "rg-hashistack-lab",
            "subscriptionId": "00000000-0000-4000-8000-000000000001",
            "tags": tags_str,
            "tagsList": tags_list,
            "vmId": vm_id,
            "vmScaleSetName": scale_set,
            "vmSize": "Standard_D2s_v5",
            "zone": "1"
        },
        "network": {
            "interface": [{
                "ipv4": {"ipAddress": [{"privateIpAddress": ip, "publicIpAddress": ""}], "subnet": [{"address": ip, "prefix": "32"}]},
                "ipv6": {"ipAddress": []},
                "macAddress": "000D3A000000"
            }]
        }
    })
}

fn hex_of(s: &str) -> String {
    let h = s
        .bytes()
        .fold(0u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64));
    format!("{:x}", h & 0xffff_ffff)
}

#[derive(Deserialize)]
struct TokenQuery {
    #[serde(rename = "api-version")]
    api_version: Option<String>,
    resource: Option<String>,
}

fn check_headers(h: &HeaderMap) -> Option<Response> {
    if h.get("x-forwarded-for").is_some() {
        return Some((StatusCode::FORBIDDEN, "proxied requests are refused").into_response());
    }
    if h.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
        return Some(
            (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "Bad request. Required metadata header not specified"})),
            )
                .into_response(),
        );
    }
    None
}

async fn instance(State(s): State<Shared>, h: HeaderMap) -> Response {
    if let Some(r) = check_headers(&h) {
        return r;
    }
    let st = s.lock().expect("imds state").clone();
    if let Some(code) = st.fail_with {
        return StatusCode::from_u16(code)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            .into_response();
    }
    Json(st.document).into_response()
}

#[derive(Deserialize)]
struct LeafQuery {
    #[serde(rename = "api-version")]
    api_version: Option<String>,
    format: Option<String>,
}

/// `GET /metadata/instance/compute/userData`: as Azure, only from api-version 2021-01-01 and only with
/// `format=text` (a leaf), answering the base64 text (empty when the scale set has none).
async fn user_data(State(s): State<Shared>, h: HeaderMap, Query(q): Query<LeafQuery>) -> Response {
    if let Some(r) = check_headers(&h) {
        return r;
    }
    let st = s.lock().expect("imds state").clone();
    if let Some(code) = st.fail_with {
        return StatusCode::from_u16(code)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            .into_response();
    }
    match q.api_version.as_deref() {
        Some(v) if v >= "2021-01-01" => {}
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "Bad request. api-version is invalid or was not specified in the request."})),
            )
                .into_response()
        }
    }
    if q.format.as_deref() != Some("text") {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"error": "Bad request. format is invalid for a leaf node: use format=text"}),
            ),
        )
            .into_response();
    }
    (
        StatusCode::OK,
        [("content-type", "text/plain; charset=utf-8")],
        st.user_data,
    )
        .into_response()
}

/// An unsigned JWT with the claims Azurite's `--oauth basic` checks. Nothing verifies signatures in the lab.
pub fn lab_token(resource: &str, now: i64, ttl: i64) -> String {
    lab_token_for(resource, DEFAULT_OID, now, ttl)
}

/// [`lab_token`] for the principal `oid`.
pub fn lab_token_for(resource: &str, oid: &str, now: i64, ttl: i64) -> String {
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let header = json!({"typ": "JWT", "alg": "RS256", "kid": "lab"});
    let claims = json!({
        "aud": resource.trim_end_matches('/'),
        "iss": format!("https://sts.windows.net/{LAB_TENANT}/"),
        "iat": now, "nbf": now - 60, "exp": now + ttl,
        "oid": oid,
        "tid": LAB_TENANT,
    });
    format!(
        "{}.{}.{}",
        b64(&header),
        b64(&claims),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b"lab-signature")
    )
}

async fn token(State(s): State<Shared>, h: HeaderMap, Query(q): Query<TokenQuery>) -> Response {
    if let Some(r) = check_headers(&h) {
        return r;
    }
    let (fail_with, oid) = {
        let st = s.lock().expect("imds state");
        (st.fail_with, st.oid.clone())
    };
    if let Some(code) = fail_with {
        return StatusCode::from_u16(code)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            .into_response();
    }
    let (Some(_), Some(resource)) = (q.api_version, q.resource) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_request"})),
        )
            .into_response();
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let ttl = 3600;
    Json(json!({
        "access_token": lab_token_for(&resource, &oid, now, ttl),
        "expires_in": ttl.to_string(),
        "expires_on": (now + ttl).to_string(),
        "not_before": (now - 60).to_string(),
        "resource": resource,
        "token_type": "Bearer"
    }))
    .into_response()
}

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/metadata/instance", get(instance))
        .route("/metadata/instance/compute/userData", get(user_data))
        .route("/metadata/identity/oauth2/token", get(token))
        .with_state(state)
}

/// Serves a fake IMDS on `addr` until the returned task is aborted.
pub async fn serve(
    addr: SocketAddr,
    state: Shared,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, router(state)).await;
    }))
}
