use std::process::ExitCode;

fn main() -> ExitCode {
    lunanode_csi::cli::main()
}
