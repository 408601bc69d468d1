//! `tokenfan-floor [--listen ADDR]`: the floor peer of `make bench` (see the library's docs).
//! One current-thread tokio runtime; prints `listening on http://ADDR` once bound.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut listen = "127.0.0.1:0".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(addr)) => listen = addr,
            _ => {
                eprintln!("usage: tokenfan-floor [--listen ADDR]   (default 127.0.0.1:0)");
                return ExitCode::from(2);
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokenfan-floor: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        println!("listening on http://{}", listener.local_addr()?);
        tokenfan_floor::serve(listener).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokenfan-floor: {e}");
            ExitCode::from(1)
        }
    }
}
