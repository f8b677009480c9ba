//! The broker binary used by the end-to-end tests: the same command line as `switchboard`.

use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() -> std::process::ExitCode {
    switchboard_broker::cli::main()
}
