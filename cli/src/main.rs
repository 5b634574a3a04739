//! `lumen` binary: parses the command line and runs it (see the library).

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let code = lumen::main_with_args(std::env::args_os()).await;
    std::process::exit(code);
}
