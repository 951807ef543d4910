//! What a consultant types and reads: each error's causes printed once on one line, zero
//! and out-of-range values refused, tokens pasted as mail wraps and case-folds them.

use cairn::Site;

fn invite(site: &Site, args: &[&str]) -> String {
    let mut all = vec!["trust", "invite", "--json"];
    all.extend_from_slice(args);
    let out: serde_json::Value = serde_json::from_str(&site.ok(&all)).unwrap();
    out["token"].as_str().unwrap().to_owned()
}

#[test]
fn a_truncated_token_names_its_cause_once() {
    let (smith, jones) = (Site::new(), Site::new());
    let token = invite(&smith, &[]);
    // The prefix and 16 base32 characters: the token's first 10 bytes, cut mid-header.
    let cut = &token[.."cairn-invite-".len() + 16];
    let line = jones.fails(&["trust", "accept", cut, "--yes"]);
    assert_eq!(
        line,
        "error: invite token is damaged or truncated: truncated: needed 23 more bytes"
    );
}

#[test]
fn a_port_in_use_names_its_cause_once() {
    let site = Site::new();
    // QUIC listens on UDP: hold the port first.
    let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let line = site.fails(&["node", "run", "--no-mdns", "--listen", &listen]);
    assert_eq!(
        line,
        format!(
            "error: cannot listen on /ip4/127.0.0.1/udp/{port}/quic-v1: Address already in use (os error 98)"
        )
    );
}
