//! The `icmp` binary: parses the command line and calls into the library (see `cli`).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
