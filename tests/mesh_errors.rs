//! The mesh's errors as a user reads them: typed errors whose messages never repeat their
//! source, walked into one line by the CLI's printer.

use cairn::Site;

#[test]
fn a_bad_listen_address_names_the_flag_and_the_text_once() {
    let site = Site::new();
    let line = site.fails(&["node", "run", "--no-mdns", "--listen", "nonsense"]);
    assert!(
        line.starts_with("error: --listen: \"nonsense\" is not HOST:PORT: "),
        "{line}"
    );
    assert_eq!(line.matches("nonsense").count(), 1, "{line}");
    let line = site.fails(&["node", "run", "--no-mdns", "--listen", "/not/a/multiaddr"]);
    assert!(
        line.starts_with("error: --listen: \"/not/a/multiaddr\" is not a multiaddr: "),
        "{line}"
    );
    assert_eq!(line.matches("/not/a/multiaddr").count(), 1, "{line}");
}

#[test]
fn a_bad_bootstrap_address_names_the_flag_and_the_text_once() {
    let site = Site::new();
    let line = site.fails(&[
        "node",
        "run",
        "--no-mdns",
        "--listen",
        "127.0.0.1:0",
        "--bootstrap",
        "nowhere:notaport",
    ]);
    assert!(
        line.starts_with("error: --bootstrap: \"nowhere:notaport\" is not HOST:PORT: "),
        "{line}"
    );
    assert_eq!(line.matches("nowhere:notaport").count(), 1, "{line}");
}
