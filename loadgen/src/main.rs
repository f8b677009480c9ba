//! The `switchboard-loadgen` binary.

use clap::Parser;
use switchboard_loadgen::cli::Cli;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let common = cli.scenario.common().clone();
    let result = match switchboard_loadgen::run(cli).await {
        Ok(report) => {
            print!("{}", report.table());
            report.write_files(&common)
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
