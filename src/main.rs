//! The `icmp` binary: parses the command line and calls into the library (see `cli`).

mod cli;

/// jemalloc instead of glibc's malloc: under thousands of tasks on few threads glibc spent a
/// quarter of the worker's CPU in malloc, free and chunk consolidation; jemalloc cut the CPU per
/// message by a third at about the same peak memory (see docs/performance.md).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
