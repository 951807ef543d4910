//! `cairn assets DIR` (hidden): writes the man pages and shell completions the Debian
//! package ships, from the same clap definitions the binary parses with, so they never
//! drift from the flags. packaging/deb.sh runs it and gzips the pages.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

/// The shells whose completions the package installs, with the file name each one's
/// completion directory expects.
const SHELLS: [(clap_complete::Shell, &str); 3] = [
    (clap_complete::Shell::Bash, "cairn.bash"),
    (clap_complete::Shell::Zsh, "_cairn"),
    (clap_complete::Shell::Fish, "cairn.fish"),
];

/// Writes DIR/man/cairn.1 and one page per visible subcommand at every level
/// (cairn-trust-invite.1, as git names them), and DIR/completions/ for each shell.
pub(super) fn write(out: &Path) -> Result<u8> {
    let mut command = super::Cli::command();
    command.build();
    let man_dir = out.join("man");
    std::fs::create_dir_all(&man_dir)
        .with_context(|| format!("cannot create {}", man_dir.display()))?;
    let n_pages = write_pages(&command, "cairn", &man_dir)?;
    let completions_dir = out.join("completions");
    std::fs::create_dir_all(&completions_dir)
        .with_context(|| format!("cannot create {}", completions_dir.display()))?;
    for (shell, file_name) in SHELLS {
        let path = completions_dir.join(file_name);
        let mut bytes = Vec::new();
        clap_complete::generate(shell, &mut super::Cli::command(), "cairn", &mut bytes);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "wrote {n_pages} man pages to {} and {} completions to {}",
        man_dir.display(),
        SHELLS.len(),
        completions_dir.display()
    );
    Ok(0)
}

/// The page of `command` (named `name`, e.g. cairn-trust) and those of its subcommands.
fn write_pages(command: &clap::Command, name: &str, dir: &Path) -> Result<usize> {
    // A subcommand's page is titled with its full name, so `man cairn-trust-invite` reads
    // as the command typed. clap takes names as &'static str; this one-shot command
    // leaks a few dozen short ones.
    let full_name: &'static str = Box::leak(name.to_owned().into_boxed_str());
    let titled = command.clone().name(full_name);
    let path = dir.join(format!("{name}.1"));
    let mut bytes = Vec::new();
    clap_mangen::Man::new(titled)
        .render(&mut bytes)
        .expect("rendering into a Vec cannot fail");
    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    let mut n_pages = 1;
    for sub in command.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        n_pages += write_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(n_pages)
}
