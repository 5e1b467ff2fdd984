//! Running the external tools (blkid, mkfs, resize2fs, xfs_growfs, ...) as programs with an
//! argument vector. Never through a shell: device paths and mount points are passed as
//! separate arguments, so nothing in them is ever interpreted.

use std::ffi::OsStr;
use std::process::{Command, Stdio};

use super::VolumeError;

/// `tools.txt`: the external programs the node runs, one per line with the Debian package
/// it comes from (`#` starts a comment). [`run`] starts no other program, and
/// `deploy/image/rootfs.sh` ships exactly these in the image, so code that needs a new tool
/// fails until it is listed here, and then the image carries it.
pub const TOOLS_FILE: &str = include_str!("tools.txt");

/// The programs listed in [`TOOLS_FILE`].
pub fn tools() -> impl Iterator<Item = &'static str> {
    TOOLS_FILE
        .lines()
        .filter_map(|l| l.split('#').next()?.split_whitespace().next())
}

/// Refuse a program that is not in [`TOOLS_FILE`]: the image would not have it.
fn listed(program: &str) -> Result<(), VolumeError> {
    if tools().any(|t| t == program) {
        return Ok(());
    }
    Err(VolumeError::Command {
        program: program.to_string(),
        status: "not run".to_string(),
        stderr: "not in src/volumes/tools.txt, the programs the node's image ships; list it there"
            .to_string(),
    })
}

/// What a finished program left behind.
#[derive(Debug, Clone)]
pub struct Output {
    /// The exit code; `None` when the program was killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// A `Command` error describing this run.
    pub fn error(&self, program: &str) -> VolumeError {
        let status = match self.code {
            Some(c) => format!("exit code {c}"),
            None => "killed by a signal".to_string(),
        };
        let mut stderr = self.stderr.trim().to_string();
        if stderr.is_empty() {
            stderr = self.stdout.trim().to_string();
        }
        VolumeError::Command {
            program: program.to_string(),
            status,
            stderr,
        }
    }
}

/// Run `program args...` to completion and capture its output, whatever its exit code.
/// Fails only when the program cannot be started (e.g. it is not installed) or is not one
/// of [`tools`] (unit tests of this crate may run any program).
pub fn run<I, S>(program: &str, args: I) -> Result<Output, VolumeError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    #[cfg(not(test))]
    listed(program)?;
    let args: Vec<_> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    tracing::debug!(program, ?args, "running");
    let out = Command::new(program)
        .args(&args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| VolumeError::Command {
            program: program.to_string(),
            status: "could not be started".to_string(),
            stderr: format!("{e} (is it installed and on PATH?)"),
        })?;
    Ok(Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Run a program that must succeed (exit code 0).
pub fn run_ok<I, S>(program: &str, args: I) -> Result<Output, VolumeError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = run(program, args)?;
    if out.code == Some(0) {
        Ok(out)
    } else {
        Err(out.error(program))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_not_interpreted_by_a_shell() {
        let out = run_ok("echo", ["$(id)", ";", "x y"]).unwrap();
        assert_eq!(out.stdout, "$(id) ; x y\n");
    }

    #[test]
    fn failures_carry_the_exit_code_and_stderr() {
        let err = run_ok("sh", ["-c", "echo oops >&2; exit 3"]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("exit code 3") && msg.contains("oops"), "{msg}");
    }

    #[test]
    fn only_listed_tools_are_run() {
        let tools: Vec<_> = tools().collect();
        assert!(
            tools.contains(&"mkfs.ext4") && tools.contains(&"xfs_spaceman"),
            "{tools:?}"
        );
        assert!(
            !tools.iter().any(|t| t.contains('#') || *t == "program"),
            "{tools:?}"
        );
        listed("blkid").unwrap();
        let msg = listed("echo").unwrap_err().to_string();
        assert!(msg.contains("echo") && msg.contains("tools.txt"), "{msg}");
    }

    #[test]
    fn a_missing_program_is_a_clear_error() {
        let err = run("definitely-not-a-program-xyz", ["a"]).unwrap_err();
        assert!(matches!(err, VolumeError::Command { .. }), "{err}");
    }
}
