//! cairn-sim: the deterministic simulator. The replication engine it drives arrives with
//! the "Replication engine and deterministic simulator" issue; until then it only checks
//! that the protocol crate links and reports what it will do.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("-h" | "--help" | "help") => {
            println!("cairn-sim: deterministic simulation of the cairn mesh");
            println!();
            println!(
                "Not built yet: scenarios, swarm and bench arrive with the replication engine."
            );
            std::process::ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("error: cairn-sim has no command {other:?} yet (the replication engine is not built)");
            std::process::ExitCode::from(2)
        }
    }
}
