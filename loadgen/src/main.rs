//! The `switchboard-loadgen` binary.

use clap::Parser;
use switchboard_loadgen::cli::Cli;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let (json, plot) = (cli.scenario.common().json.clone(), cli.scenario.common().plot.clone());
    match switchboard_loadgen::run(cli).await {
        Ok(report) => {
            print!("{}", report.table());
            if let Some(path) = json
                && let Err(e) = report.write_json(&path)
            {
                eprintln!("error: cannot write {}: {e}", path.display());
                return std::process::ExitCode::FAILURE;
            }
            if let Some(path) = plot
                && let Err(e) = report.write_svg(&path)
            {
                eprintln!("error: cannot write {}: {e}", path.display());
                return std::process::ExitCode::FAILURE;
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
