//! README.md cannot drift from the binary: every flag of `serve --help` is documented, and
//! every `lunanode-csi ...` command the README shows names a real subcommand with real flags.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_lunanode-csi");

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

fn help(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{args:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// `--long-flag` tokens in a text.
fn flags(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (i, _) in text.match_indices("--") {
        let rest = &text[i + 2..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
            .collect();
        let before = text[..i].chars().last();
        if name.len() > 1 && !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-') {
            found.push(format!("--{name}"));
        }
    }
    found.sort();
    found.dedup();
    found
}

#[test]
fn every_serve_flag_is_in_the_readme() {
    let readme = readme();
    let missing: Vec<String> = flags(&help(&["serve"]))
        .into_iter()
        .filter(|f| f != "--help" && f != "--version")
        .filter(|f| !readme.contains(&format!("`{f}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md does not document: {missing:?}"
    );
}

#[test]
fn every_command_in_the_readme_exists_with_its_flags() {
    let readme = readme();
    let mut in_sh = false;
    let mut checked = 0;
    for line in readme.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        let Some(cmd) = line.strip_prefix("lunanode-csi ").filter(|_| in_sh) else {
            continue;
        };
        let words: Vec<&str> = cmd
            .split_whitespace()
            .take_while(|w| w.chars().all(|c| c.is_ascii_lowercase()))
            .collect();
        let h = help(&words);
        for f in flags(cmd) {
            assert!(
                h.contains(&f),
                "`lunanode-csi {cmd}`: {f} is not a flag of {words:?}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} commands found in README.md");
}
