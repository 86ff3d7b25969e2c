//! End-to-end: `.consul` names through the real Consul 1.8.7 of the lab (issue 10, item 3).
//!
//! Every node gets a systemd-resolved drop-in that sends `~consul` to its Consul agent's DNS port; the Consul
//! tier's bootstrap gives the anonymous token Consul's documented DNS policy (read nodes and services), without
//! which a default-deny Consul answers no DNS query. Proven here: the address the drop-in names answers
//! `consul.service.consul` with every Consul server, and `<node>.node.consul` with the node's address.
//!
//! Net 133 (this suite's).

use hashistack_agent::node::Role;
use hashistack_e2e::{healthy_lab, nodes_of, options};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// A DNS query for `name`, type A, recursion desired (RFC 1035 4.1).
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Skips a (possibly compressed) name at `i`; returns the index after it.
fn skip_name(b: &[u8], mut i: usize) -> usize {
    loop {
        let len = b[i] as usize;
        if len == 0 {
            return i + 1;
        }
        if len & 0xC0 == 0xC0 {
            return i + 2;
        }
        i += 1 + len;
    }
}

/// (response code, A records) of an answer to query `id`.
fn answers(b: &[u8], id: u16) -> (u8, Vec<Ipv4Addr>) {
    assert!(b.len() >= 12, "short answer");
    assert_eq!(u16::from_be_bytes([b[0], b[1]]), id);
    let rcode = b[3] & 0x0F;
    let qd = u16::from_be_bytes([b[4], b[5]]);
    let an = u16::from_be_bytes([b[6], b[7]]);
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(b, i) + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        i = skip_name(b, i);
        let kind = u16::from_be_bytes([b[i], b[i + 1]]);
        let len = u16::from_be_bytes([b[i + 8], b[i + 9]]) as usize;
        i += 10;
        if kind == 1 && len == 4 {
            out.push(Ipv4Addr::new(b[i], b[i + 1], b[i + 2], b[i + 3]));
        }
        i += len;
    }
    (rcode, out)
}

async fn resolve(server: SocketAddr, name: &str) -> (u8, Vec<Ipv4Addr>) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let id = 0x4a17;
    sock.send_to(&query(id, name), server).await.unwrap();
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(3), sock.recv(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no DNS answer from {server} for {name}"))
        .unwrap();
    answers(&buf[..n], id)
}

/// The `DNS=` address of a node's rendered drop-in.
fn drop_in_dns(root: &std::path::Path) -> SocketAddr {
    let text =
        std::fs::read_to_string(root.join("etc/systemd/resolved.conf.d/consul.conf")).unwrap();
    assert!(text.contains("\nDomains=~consul\n"), "{text}");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("DNS="))
        .expect("DNS= line");
    line.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drop_in_names_a_consul_that_answers_service_and_node_names() {
    let mut o = options("dns", 133);
    o.vault_servers = 1;
    o.jumpbox = Some(false);
    let lab = healthy_lab(o).await;
    let servers: Vec<Ipv4Addr> = nodes_of(&lab, Role::ConsulServer)
        .into_iter()
        .map(|i| lab.nodes[i].def.ip)
        .collect();
    for i in [
        nodes_of(&lab, Role::ConsulServer)[0],
        nodes_of(&lab, Role::VaultServer)[0],
    ] {
        let n = &lab.nodes[i];
        let dns = drop_in_dns(&n.root);
        assert_eq!(dns, SocketAddr::from((n.def.ip, 8600)), "{}", n.def.name);
        // The anonymous token's DNS policy is set by the Consul tier's bootstrap: until then Consul answers
        // nothing for services. Ask until the tier is done and the answer is complete.
        let start = Instant::now();
        let mut got = loop {
            let (rcode, mut ips) = resolve(dns, "consul.service.consul").await;
            ips.sort();
            if rcode == 0 && ips.len() == servers.len() {
                break ips;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{}: consul.service.consul: rcode {rcode}, {ips:?}",
                n.def.name
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        got.sort();
        let mut want = servers.clone();
        want.sort();
        assert_eq!(got, want, "{}", n.def.name);
        let (rcode, ips) = resolve(dns, &format!("{}.node.consul", n.def.name)).await;
        assert_eq!((rcode, ips), (0, vec![n.def.ip]), "{}", n.def.name);
    }
    lab.down().await;
}
