//! `tokenfan-loadgen`: parses the command line, raises the open-file limit, runs on a tokio
//! runtime of `--threads` workers. Exit status 0 = every stream clean, 1 = errors or
//! violations were counted, 2 = the run could not be made (bad usage, unreachable target).

use std::process::ExitCode;

use clap::Parser as _;
use tokenfan_loadgen::{Cli, procfs, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Thousands of connections: the soft limit is often 1024.
    if let Err(e) = procfs::raise_nofile_limit() {
        eprintln!("tokenfan-loadgen: could not raise the open-file limit: {e:#}");
    }
    let runtime = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokenfan-loadgen: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(outcome) if outcome.ok => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tokenfan-loadgen: {e:#}");
            ExitCode::from(2)
        }
    }
}
