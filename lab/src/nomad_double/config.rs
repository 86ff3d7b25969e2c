//! The agent's configuration: the merged `*.json` files (`nomad agent -config=…`).

use super::*;

#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub region: String,
    pub datacenter: String,
    pub data_dir: PathBuf,
    pub bind: IpAddr,
    pub http_port: u16,
    pub server: Option<ServerConfig>,
    pub client: Option<ClientConfig>,
    pub acl_enabled: bool,
    pub tls: Option<TlsConfig>,
    /// `vault.default_identity` (servers) and the files a client re-reads for its `vault`/`consul` blocks.
    pub jobs: jobs::JobsConfig,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bootstrap_expect: usize,
    /// Other servers (their addresses; the own address is dropped).
    pub peers: Vec<IpAddr>,
    pub encrypt: Option<String>,
    /// `server.min_heartbeat_ttl`: the TTL handed to clients (they heartbeat every TTL/2).
    pub min_heartbeat_ttl: Duration,
    /// `server.heartbeat_grace`: how much longer than the TTL the leader waits before a node is `down`.
    pub heartbeat_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub servers: Vec<IpAddr>,
    /// `client.node_class` (empty by default, as in Nomad).
    pub node_class: String,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: Option<PathBuf>,
}

/// Objects merge key by key; anything else is replaced by the later file (Nomad appends lists; the
/// agent never splits one list over two files).
fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Go's `time.ParseDuration` for what configs use: a sequence of `<number><unit>` with units `ns`, `us`,
/// `µs`, `ms`, `s`, `m`, `h` (`10s`, `1m30s`, `1.5s`, `250ms`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("time: invalid duration {s:?}");
    let mut rest = s.trim();
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("time: missing unit in duration {s:?}"))?;
        let value: f64 = rest[..n].parse().map_err(|_| bad())?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => {
                return Err(format!(
                    "time: unknown unit {:?} in duration {s:?}",
                    &rest[..u]
                ))
            }
        };
        total += value * scale;
        rest = &rest[u..];
    }
    Ok(Duration::from_secs_f64(total))
}

/// The host name, as Nomad's default for `name`.
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

fn parse_join(entries: &[Value], what: &str) -> Result<Vec<IpAddr>, String> {
    entries
        .iter()
        .map(|v| {
            let s = v.as_str().ok_or(format!("{what}: entries must be strings"))?;
            if s.contains('=') {
                return Err(format!(
                    "{what}: cloud auto-join ({s:?}) is not implemented by the double; list addresses"
                ));
            }
            let host = s.parse::<SocketAddr>().map(|a| a.ip()).or_else(|_| {
                s.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
            });
            host.map_err(|_| format!("{what}: {s:?} is not an IP address (optionally with a port)"))
        })
        .collect()
}

/// Every `*.json` of the given directories (sorted by name) and the given files, merged.
pub fn load_merged(paths: &[PathBuf]) -> Result<Value, String> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|f| f.is_file())
                .collect();
            v.sort();
            for f in v {
                match f.extension().and_then(|x| x.to_str()) {
                    Some("json") => files.push(f),
                    Some("hcl") => {
                        return Err(format!(
                            "{}: HCL is not read by the double (JSON only)",
                            f.display()
                        ))
                    }
                    _ => {}
                }
            }
        } else {
            files.push(p.clone());
        }
    }
    if files.is_empty() {
        return Err("no *.json configuration found".into());
    }
    let mut merged = json!({});
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", f.display()))?;
        merge(&mut merged, v);
    }
    Ok(merged)
}

impl Config {
    /// Reads and merges the given files and every `*.json` of the given directories (sorted by name).
    pub fn load(paths: &[PathBuf]) -> Result<Config, String> {
        let mut c = Config::from_value(&load_merged(paths)?)?;
        c.jobs.sources = paths.to_vec();
        Ok(c)
    }

    pub fn from_value(v: &Value) -> Result<Config, String> {
        let s = |p: &str| v.pointer(p).and_then(Value::as_str).map(String::from);
        let b = |p: &str| v.pointer(p).and_then(Value::as_bool).unwrap_or(false);
        let bind: IpAddr = s("/bind_addr")
            .unwrap_or_else(|| "0.0.0.0".into())
            .parse()
            .map_err(|_| "bind_addr: not an IP address".to_string())?;
        let data_dir = PathBuf::from(s("/data_dir").ok_or("data_dir is required")?);
        let http_port = v
            .pointer("/ports/http")
            .and_then(Value::as_u64)
            .map(|p| p as u16)
            .unwrap_or(DEFAULT_HTTP_PORT);
        let server = if b("/server/enabled") {
            let join = v
                .pointer("/server/server_join/retry_join")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let peers: Vec<IpAddr> = parse_join(&join, "server_join.retry_join")?
                .into_iter()
                .filter(|ip| *ip != bind)
                .collect();
            let duration = |p: &str, default: Duration| match s(p) {
                Some(d) => {
                    parse_duration(&d).map_err(|e| format!("{}: {e}", &p[1..].replace('/', ".")))
                }
                None => Ok(default),
            };
            Some(ServerConfig {
                min_heartbeat_ttl: duration(
                    "/server/min_heartbeat_ttl",
                    DEFAULT_MIN_HEARTBEAT_TTL,
                )?,
                heartbeat_grace: duration("/server/heartbeat_grace", DEFAULT_HEARTBEAT_GRACE)?,
                bootstrap_expect: v
                    .pointer("/server/bootstrap_expect")
                    .and_then(Value::as_u64)
                    .unwrap_or(1)
                    .max(1) as usize,
                peers,
                encrypt: s("/server/encrypt"),
            })
        } else {
            None
        };
        let client = if b("/client/enabled") {
            let join = v
                .pointer("/client/server_join/retry_join")
                .or_else(|| v.pointer("/client/servers"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            Some(ClientConfig {
                servers: parse_join(&join, "client.server_join.retry_join")?,
                node_class: s("/client/node_class").unwrap_or_default(),
            })
        } else {
            None
        };
        if server.is_none() && client.is_none() {
            return Err("neither server.enabled nor client.enabled".into());
        }
        let tls = if b("/tls/http") {
            Some(TlsConfig {
                cert_file: s("/tls/cert_file")
                    .ok_or("tls.cert_file is required")?
                    .into(),
                key_file: s("/tls/key_file").ok_or("tls.key_file is required")?.into(),
                ca_file: s("/tls/ca_file").map(PathBuf::from),
            })
        } else {
            None
        };
        Ok(Config {
            name: s("/name")
                .or_else(hostname)
                .unwrap_or_else(|| bind.to_string()),
            region: s("/region").unwrap_or_else(|| "global".into()),
            datacenter: s("/datacenter").unwrap_or_else(|| "dc1".into()),
            data_dir,
            bind,
            http_port,
            server,
            client,
            acl_enabled: b("/acl/enabled"),
            tls,
            jobs: jobs::JobsConfig::from_value(v)?,
        })
    }

    pub(super) fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_merges_the_agents_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("nomad.json"),
            r#"{"name":"n1","data_dir":"/tmp/x","bind_addr":"127.0.0.31","acl":{"enabled":true},
               "server":{"enabled":true,"bootstrap_expect":3,"server_join":{"retry_join":["127.0.0.31","127.0.0.32","127.0.0.33:4648"]}},
               "tls":{"http":true,"cert_file":"c.pem","key_file":"k.pem","ca_file":"ca.pem"}}"#,
        )
        .unwrap();
        std::fs::write(
            d.path().join("gossip.json"),
            r#"{"server":{"encrypt":"k3y"}}"#,
        )
        .unwrap();
        std::fs::write(d.path().join("notes.txt"), "ignored").unwrap();
        let c = Config::load(&[d.path().to_path_buf()]).unwrap();
        let s = c.server.unwrap();
        assert_eq!(s.bootstrap_expect, 3);
        assert_eq!(s.encrypt.as_deref(), Some("k3y"));
        assert_eq!(
            s.peers,
            vec![
                "127.0.0.32".parse::<IpAddr>().unwrap(),
                "127.0.0.33".parse().unwrap()
            ]
        );
        assert!(c.acl_enabled && c.tls.is_some());
        assert_eq!(c.http_port, DEFAULT_HTTP_PORT);
        let bad = json!({"data_dir":"/x","server":{"enabled":true,"server_join":{"retry_join":["provider=azure tag_name=x"]}}});
        assert!(Config::from_value(&bad).unwrap_err().contains("auto-join"));
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("10x").is_err());
        let c = Config::from_value(&json!({"data_dir": "/x", "server": {"enabled": true,
            "min_heartbeat_ttl": "300ms", "heartbeat_grace": "1s"}}))
        .unwrap();
        let s = c.server.unwrap();
        assert_eq!(
            (s.min_heartbeat_ttl, s.heartbeat_grace),
            (Duration::from_millis(300), Duration::from_secs(1))
        );
        assert!(Config::from_value(
            &json!({"data_dir": "/x", "server": {"enabled": true, "heartbeat_grace": "soon"}})
        )
        .unwrap_err()
        .contains("server.heartbeat_grace"));
    }
}
