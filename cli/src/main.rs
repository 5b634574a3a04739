//! `lumen` binary: parses the command line and runs it (see the library).

// Output is written with blocking calls from the main task. With worker threads apart from
// it, the gRPC connection keeps answering the server's HTTP/2 keepalive pings while a slow
// reader (a pager, a paused pipe) holds the output: the server then sees a slow client (and
// reports what it had to drop as lost events) instead of a dead one it disconnects.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let code = lumen::main_with_args(std::env::args_os()).await;
    std::process::exit(code);
}
