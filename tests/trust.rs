//! Two offices set up trust with the CLI: invite, accept (after seeing who is inviting),
//! list, change quota, revoke; and every bad token or request changes nothing. (A quota
//! below what is already held is refused too: node/src/trust.rs tests that, since only
//! the mesh fills the counts.)

use cairn::Site;

fn init(site: &Site, name: &str) -> serde_json::Value {
    serde_json::from_str(&site.ok(&["init", "--site-name", name, "--json"])).unwrap()
}

fn invite(site: &Site, args: &[&str]) -> String {
    let mut all = vec!["trust", "invite", "--json"];
    all.extend_from_slice(args);
    let out: serde_json::Value = serde_json::from_str(&site.ok(&all)).unwrap();
    out["token"].as_str().unwrap().to_owned()
}

fn partners(site: &Site) -> serde_json::Value {
    serde_json::from_str(&site.ok(&["trust", "list", "--json"])).unwrap()
}

#[test]
fn invite_accept_limit_and_revoke() {
    let (smith, jones) = (Site::empty(), Site::empty());
    let smith_info = init(&smith, "Smith & Co, Main St");
    init(&jones, "Jones IT, Harbour Rd");
    let token = invite(
        &smith,
        &[
            "--quota",
            "500GB",
            "--expires",
            "7d",
            "--address",
            "/dns4/smith.example/udp/4001/quic-v1",
            "--address",
            "/ip4/203.0.113.9/udp/4001/quic-v1",
        ],
    );
    assert!(token.starts_with("cairn-invite-"));

    // Without a terminal and without --yes, nothing is accepted.
    let line = jones.fails(&["trust", "accept", &token]);
    assert!(line.contains("pass --yes"), "{line}");
    assert_eq!(partners(&jones), serde_json::json!([]));

    let accepted: serde_json::Value = serde_json::from_str(&jones.ok(&[
        "trust", "accept", &token, "--quota", "2TiB", "--yes", "--json",
    ]))
    .unwrap();
    assert_eq!(accepted["name"], "Smith & Co, Main St");
    assert_eq!(accepted["site_id"], smith_info["site_id"]);
    assert_eq!(accepted["fingerprint"], smith_info["fingerprint"]);
    let list = partners(&jones);
    let smith_row = &list[0];
    assert_eq!(smith_row["they_store_for_us_bytes"], 500_000_000_000u64);
    assert_eq!(smith_row["we_store_for_them_bytes"], 2u64 << 40);
    assert_eq!(smith_row["grant_version"], 1);
    assert_eq!(
        smith_row["addresses"],
        serde_json::json!([
            "/dns4/smith.example/udp/4001/quic-v1",
            "/ip4/203.0.113.9/udp/4001/quic-v1"
        ])
    );
    // Nothing is stored either way and nobody has been seen until the mesh runs.
    assert_eq!(smith_row["we_hold_for_them_bytes"], 0);
    assert_eq!(smith_row["they_hold_for_us_bytes"], 0);
    assert_eq!(smith_row["last_seen_unix_ms"], serde_json::Value::Null);
    let human = jones.ok(&["trust", "list"]);
    assert!(
        human.contains("Smith & Co, Main St")
            && human.contains("0 B of 465.7 GiB")
            && human.contains("0 B of 2.0 TiB")
            && human.contains("never"),
        "{human}"
    );

    // Single use.
    let line = jones.fails(&["trust", "accept", &token, "--yes"]);
    assert!(line.contains("already accepted"), "{line}");

    // Quota, given as the site id typed without dashes in lower case.
    let smith_id = smith_info["site_id"].as_str().unwrap();
    let typed = smith_id.replace('-', "").to_lowercase();
    jones.ok(&["trust", "quota", &typed, "750GB"]);
    let row = &partners(&jones)[0];
    assert_eq!(row["we_store_for_them_bytes"], 750_000_000_000u64);
    assert_eq!(row["grant_version"], 2);

    jones.ok(&["trust", "revoke", smith_id]);
    let row = &partners(&jones)[0];
    assert_eq!(row["revoked"], true);
    assert_eq!(row["we_store_for_them_bytes"], 0);
    assert_eq!(row["grant_version"], 3);
    assert!(jones.ok(&["trust", "list"]).contains("revoked"));
}

#[test]
fn bad_tokens_and_requests_change_nothing() {
    let (smith, jones) = (Site::empty(), Site::empty());
    let smith_info = init(&smith, "Smith");
    let jones_info = init(&jones, "Jones");
    let token = invite(&smith, &[]);

    // Tampered: one character of the body changed.
    let mut tampered = token.clone().into_bytes();
    let at = tampered.len() - 20;
    tampered[at] = if tampered[at] == b'a' { b'b' } else { b'a' };
    let line = jones.fails(&[
        "trust",
        "accept",
        std::str::from_utf8(&tampered).unwrap(),
        "--yes",
    ]);
    assert!(
        line.contains("altered") || line.contains("damaged"),
        "{line}"
    );
    // Truncated.
    let line = jones.fails(&["trust", "accept", &token[..token.len() - 7], "--yes"]);
    assert!(
        line.contains("damaged or truncated") || line.contains("altered"),
        "{line}"
    );
    // Not a token at all.
    let line = jones.fails(&["trust", "accept", "hello", "--yes"]);
    assert!(line.contains("not a cairn invite"), "{line}");
    // Our own invite.
    let line = smith.fails(&["trust", "accept", &token, "--yes"]);
    assert!(line.contains("your own site"), "{line}");
    // Expired.
    let short = invite(&smith, &["--expires", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let line = jones.fails(&["trust", "accept", &short, "--yes"]);
    assert!(line.contains("expired"), "{line}");
    assert_eq!(partners(&jones), serde_json::json!([]));

    // Unknown site, own site, bad sizes and typos in site ids.
    let stranger = Site::empty();
    let stranger_id = init(&stranger, "Stranger")["site_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let line = jones.fails(&["trust", "quota", &stranger_id, "1TB"]);
    assert!(line.contains("not a partner"), "{line}");
    let line = jones.fails(&["trust", "revoke", &stranger_id]);
    assert!(line.contains("not a partner"), "{line}");
    let line = jones.fails(&["trust", "revoke", jones_info["site_id"].as_str().unwrap()]);
    assert!(line.contains("cannot revoke itself"), "{line}");
    let mut typo = smith_info["site_id"]
        .as_str()
        .unwrap()
        .to_owned()
        .into_bytes();
    typo[0] = if typo[0] == b'A' { b'B' } else { b'A' };
    let line = jones.fails(&["trust", "quota", std::str::from_utf8(&typo).unwrap(), "1TB"]);
    assert!(line.contains("typo"), "{line}");
    let out = jones.run(&["trust", "invite", "--quota", "12XB"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit"));
    let out = jones.run(&["trust", "invite", "--expires", "7y"]);
    assert_eq!(out.status.code(), Some(2));
    let long = "x".repeat(300);
    let line = jones.fails(&["trust", "invite", "--address", &long]);
    assert!(line.contains("bad address hints"), "{line}");
    assert_eq!(partners(&jones), serde_json::json!([]));

    // The real token still works after all that.
    jones.ok(&["trust", "accept", &token, "--yes"]);
    assert_eq!(partners(&jones).as_array().unwrap().len(), 1);
}
