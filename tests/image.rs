//! The image ships every program the driver runs: each program the code names is in
//! `src/volumes/tools.txt` (which `deploy/image/rootfs.sh` ships and `cmd::run` enforces),
//! and nothing outside `src/volumes/cmd.rs` starts programs except the simulator's and the
//! demo's loop-device set-up, which run on a developer's machine, never in the node plugin.
//! `tests/image/run.sh` (from `tests/run-all.sh`, as root) builds the image's root and runs
//! every listed program inside it.

use std::path::{Path, PathBuf};

use lunanode_csi::volumes::{cmd, fs};

/// Files that may start programs: the one runner of the node's tools, and the simulator's
/// and demo's `losetup`/`cp` (see `src/sim/backing.rs`, `src/demo/env.rs`).
const MAY_START_PROGRAMS: &[&str] = &[
    "src/volumes/cmd.rs",
    "src/sim/backing.rs",
    "src/demo/env.rs",
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every `src/**/*.rs` as (path relative to the repository, text).
fn source_files() -> Vec<(String, String)> {
    let mut paths = Vec::new();
    sources(&repo().join("src"), &mut paths);
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(repo())
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (rel, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

/// Calls that name their program through a variable, and where it comes from (checked
/// below by asking that code for every program it can give).
const INDIRECT: &[(&str, &str)] = &[("src/volumes/fs.rs", "<program>")]; // fs::mkfs_command

/// The string literals passed first to `cmd::run(`/`cmd::run_ok(`, across line breaks; an
/// argument that is not a literal comes back as `<argument>`.
fn programs_run(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for call in ["cmd::run(", "cmd::run_ok("] {
        for (i, _) in text.match_indices(call) {
            let rest = text[i + call.len()..].trim_start();
            if let Some(lit) = rest.strip_prefix('"') {
                found.push(lit[..lit.find('"').unwrap()].to_string());
            } else {
                let arg: String = rest
                    .chars()
                    .take_while(|c| *c != ',' && *c != ')')
                    .collect();
                found.push(format!("<{}>", arg.trim()));
            }
        }
    }
    found
}

#[test]
fn the_tool_list_names_a_package_for_every_program() {
    let tools: Vec<&str> = cmd::tools().collect();
    assert!(tools.len() >= 8, "{tools:?}");
    for line in cmd::TOOLS_FILE.lines() {
        let fields: Vec<&str> = line.split('#').next().unwrap().split_whitespace().collect();
        assert!(
            fields.is_empty() || fields.len() == 2,
            "tools.txt: `{line}` is not `program package`"
        );
    }
    let mut sorted = tools.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        tools.len(),
        "a program is listed twice: {tools:?}"
    );
}

#[test]
fn every_program_the_code_runs_is_in_the_tool_list() {
    let tools: Vec<&str> = cmd::tools().collect();
    let mut named = Vec::new();
    for (path, text) in source_files() {
        if path == "src/volumes/cmd.rs" {
            continue; // its own tests run `echo` and `sh`, exempt from the list
        }
        for program in programs_run(&text) {
            if program.starts_with('<') {
                assert!(
                    INDIRECT.contains(&(path.as_str(), program.as_str())),
                    "{path} runs {program}, a program this test cannot read: name it with a \
                     literal, or add the call to INDIRECT and check what it can be"
                );
                continue;
            }
            named.push((path.clone(), program));
        }
    }
    for fs_type in fs::SUPPORTED_FS_TYPES {
        let (program, _) = fs::mkfs_command(fs_type, Path::new("/dev/x"), false).unwrap();
        named.push(("src/volumes/fs.rs".into(), program.to_string()));
    }
    assert!(named.len() >= 8, "the scan found too little: {named:?}");
    let missing: Vec<_> = named
        .iter()
        .filter(|(_, p)| !tools.contains(&p.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "programs the code runs that src/volumes/tools.txt does not list (the image would not \
         have them): {missing:?}"
    );
    for tool in &tools {
        assert!(
            named.iter().any(|(_, p)| p == tool),
            "src/volumes/tools.txt lists {tool}, which no code runs: take it off"
        );
    }
}

#[test]
fn nothing_else_starts_programs() {
    for (path, text) in source_files() {
        let starts = text.contains("Command::new") || text.contains("process::Command");
        assert!(
            !starts || MAY_START_PROGRAMS.contains(&path.as_str()),
            "{path} starts a program itself: run it through lunanode_csi::volumes::cmd (and list \
             it in src/volumes/tools.txt) so that the image ships it"
        );
    }
}

#[test]
fn the_image_is_assembled_from_the_same_list() {
    let script = std::fs::read_to_string(repo().join("deploy/image/rootfs.sh")).unwrap();
    assert!(
        script.contains("src/volumes/tools.txt"),
        "rootfs.sh must read tools.txt"
    );
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("COPY src/volumes/tools.txt /src/src/volumes/tools.txt"));
    assert!(dockerfile.contains("rootfs.sh /rootfs"));
}

#[test]
fn the_scan_reads_calls_across_lines() {
    let text = "let a = cmd::run_ok(\"dumpe2fs\", [x]);\n    cmd::run(\n        \"e2fsck\",\n        [y],\n    )?;\n    cmd::run_ok(program, args)?;\n";
    assert_eq!(programs_run(text), ["e2fsck", "dumpe2fs", "<program>"]);
}
