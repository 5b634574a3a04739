//! End-to-end tests of `lumen`'s TLS flags: the real binary against a small in-test
//! Observer server on 127.0.0.1 that requires TLS and a client certificate, with a CA and
//! certificates made by rcgen.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Command, Output};

use lumen_proto::flow::{Endpoint, Flow, Verdict};
use lumen_proto::observer::get_flows_response::ResponseTypes;
use lumen_proto::observer::observer_server::{Observer, ObserverServer};
use lumen_proto::observer::{
    GetAgentEventsRequest, GetAgentEventsResponse, GetDebugEventsRequest, GetDebugEventsResponse,
    GetFlowsRequest, GetFlowsResponse, GetNamespacesRequest, GetNamespacesResponse,
    GetNodesRequest, GetNodesResponse, Node, ServerStatusRequest, ServerStatusResponse,
};
use lumen_proto::relay::NodeState;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
};
use tokio_stream::Stream;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Serves two fixed flows, a status and one node.
struct TlsObserverServer;

fn flow(seconds: i64, pod: &str, verdict: Verdict) -> Flow {
    Flow {
        time: Some(prost_types::Timestamp { seconds, nanos: 0 }),
        node_name: "node-1".into(),
        verdict: verdict as i32,
        source: Some(Endpoint {
            namespace: "prod".into(),
            pod_name: pod.into(),
            ..Default::default()
        }),
        destination: Some(Endpoint {
            namespace: "prod".into(),
            pod_name: "db-0".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Observer for TlsObserverServer {
    type GetFlowsStream = BoxStream<GetFlowsResponse>;
    type GetAgentEventsStream = BoxStream<GetAgentEventsResponse>;
    type GetDebugEventsStream = BoxStream<GetDebugEventsResponse>;

    async fn get_flows(
        &self,
        _: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let flows = [
            flow(1000, "web-1", Verdict::Forwarded),
            flow(1001, "batch-1", Verdict::Dropped),
        ];
        let responses = flows.into_iter().map(|f| {
            Ok(GetFlowsResponse {
                node_name: f.node_name.clone(),
                time: f.time,
                response_types: Some(ResponseTypes::Flow(f)),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(responses))))
    }

    async fn get_agent_events(
        &self,
        _: Request<GetAgentEventsRequest>,
    ) -> Result<Response<Self::GetAgentEventsStream>, Status> {
        Err(Status::unimplemented("agent events"))
    }

    async fn get_debug_events(
        &self,
        _: Request<GetDebugEventsRequest>,
    ) -> Result<Response<Self::GetDebugEventsStream>, Status> {
        Err(Status::unimplemented("debug events"))
    }

    async fn get_nodes(
        &self,
        _: Request<GetNodesRequest>,
    ) -> Result<Response<GetNodesResponse>, Status> {
        Ok(Response::new(GetNodesResponse {
            nodes: vec![Node {
                name: "node-1".into(),
                state: NodeState::NodeConnected as i32,
                num_flows: 2,
                max_flows: 4095,
                ..Default::default()
            }],
        }))
    }

    async fn get_namespaces(
        &self,
        _: Request<GetNamespacesRequest>,
    ) -> Result<Response<GetNamespacesResponse>, Status> {
        Err(Status::unimplemented("namespaces"))
    }

    async fn server_status(
        &self,
        _: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        Ok(Response::new(ServerStatusResponse {
            num_flows: 2,
            max_flows: 4095,
            seen_flows: 2,
            version: "lumen 0.1.0".into(),
            ..Default::default()
        }))
    }
}

/// A CA and, signed by it, a server certificate for `observer.lumen.test` and 127.0.0.1 and
/// a client certificate `cli`; plus a second, unrelated CA (`other-ca.pem`).
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Self::ca("Lumen test CA");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write ca");
        let other = Self::ca("Unrelated test CA");
        std::fs::write(dir.path().join("other-ca.pem"), other.pem()).expect("write ca");
        for (file, names) in [
            ("server", &["observer.lumen.test", "127.0.0.1"][..]),
            ("cli", &["cli"][..]),
        ] {
            let key = KeyPair::generate().expect("key");
            let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
            let cert = CertificateParams::new(names)
                .expect("params")
                .signed_by(&key, &ca)
                .expect("sign");
            std::fs::write(dir.path().join(format!("{file}.pem")), cert.pem()).expect("write");
            std::fs::write(
                dir.path().join(format!("{file}-key.pem")),
                key.serialize_pem(),
            )
            .expect("write");
        }
        Pki { dir }
    }

    fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA")
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn arg(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }

    fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).expect("read pki file")
    }

    /// The server's TLS: its certificate, and client certificates required from the CA.
    fn mtls_server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(
                self.read("server.pem"),
                self.read("server-key.pem"),
            ))
            .client_ca_root(Certificate::from_pem(self.read("ca.pem")))
    }

    /// The flags of a client that trusts the CA and presents `cli`.
    fn client_flags(&self) -> Vec<String> {
        vec![
            "--tls".into(),
            "--tls-ca-cert-files".into(),
            self.arg("ca.pem"),
            "--tls-client-cert-file".into(),
            self.arg("cli.pem"),
            "--tls-client-key-file".into(),
            self.arg("cli-key.pem"),
        ]
    }
}

/// Starts the test server on a free loopback port, in its own runtime thread; `tls: None`
/// serves plaintext.
fn start_server(tls: Option<ServerTlsConfig>) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("local addr");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let mut builder = tonic::transport::Server::builder();
            if let Some(tls) = tls {
                builder = builder.tls_config(tls).expect("server TLS config");
            }
            builder
                .add_service(ObserverServer::new(TlsObserverServer))
                .serve_with_incoming(incoming)
                .await
                .expect("test server runs");
        });
    });
    addr
}

const TLS_ENV: &[&str] = &[
    "LUMEN_SERVER",
    "LUMEN_TLS",
    "LUMEN_TLS_CA_CERT_FILES",
    "LUMEN_TLS_CLIENT_CERT_FILE",
    "LUMEN_TLS_CLIENT_KEY_FILE",
    "LUMEN_TLS_SERVER_NAME",
    "LUMEN_TLS_ALLOW_INSECURE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// Runs `lumen` with `args` and `env` on a clean environment (no LUMEN_TLS*, no SSL_CERT_*).
fn lumen_env<S: AsRef<str>>(args: &[S], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lumen"));
    cmd.args(args.iter().map(AsRef::as_ref));
    for var in TLS_ENV {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run lumen")
}

fn lumen<S: AsRef<str>>(args: &[S]) -> Output {
    lumen_env(args, &[])
}

/// `args` then `--server addr`.
fn with_server(args: &[&str], rest: &[String], addr: &str) -> Vec<String> {
    let mut v: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    v.extend(rest.iter().cloned());
    v.extend(["--server".to_owned(), addr.to_owned()]);
    v
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The run failed with exactly one stderr line, which is returned.
fn one_line_failure(o: &Output) -> String {
    assert!(!o.status.success(), "expected failure, got: {}", stdout(o));
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err.trim_end().to_owned()
}

fn assert_status_ok(o: &Output) {
    assert!(o.status.success(), "{}", stderr(o));
    let text = stdout(o);
    assert!(text.contains("Current/Max Flows: 2/4095"), "{text}");
}

#[test]
fn mutual_tls_with_the_right_flags_serves_every_command() {
    let pki = Pki::new();
    let addr = start_server(Some(pki.mtls_server())).to_string();
    let flags = pki.client_flags();

    assert_status_ok(&lumen(&with_server(&["status"], &flags, &addr)));

    let out = lumen(&with_server(&["observe"], &flags, &addr));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("prod/web-1") && lines[0].contains("FORWARDED"),
        "{text}"
    );
    assert!(
        lines[1].contains("prod/batch-1") && lines[1].contains("DROPPED"),
        "{text}"
    );

    let out = lumen(&with_server(&["nodes"], &flags, &addr));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with("node-1") && l.contains("Connected")),
        "{}",
        stdout(&out)
    );

    // The policy commands connect the same way: this server has no PolicyInspector, and
    // says so over TLS.
    let out = lumen(&with_server(&["identity", "list"], &flags, &addr));
    let err = one_line_failure(&out);
    assert!(
        err.starts_with(&format!(
            "lumen: {addr} does not serve identities (PolicyInspector.ListIdentities)"
        )),
        "{err}"
    );
    let err = one_line_failure(&lumen(&with_server(
        &["policy", "list"],
        &flags[..3],
        &addr,
    )));
    assert!(err.contains("CertificateRequired"), "{err}");

    // Global flags: also accepted after the subcommand.
    let mut after: Vec<String> = vec!["status".into(), "--server".into(), addr.clone()];
    after.extend(flags.iter().cloned());
    assert_status_ok(&lumen(&after));
}

#[test]
fn tls_flag_forms_server_name_https_and_env() {
    let pki = Pki::new();
    let addr = start_server(Some(pki.mtls_server())).to_string();
    let identity = [
        "--tls-client-cert-file".to_owned(),
        pki.arg("cli.pem"),
        "--tls-client-key-file".to_owned(),
        pki.arg("cli-key.pem"),
    ];

    // An https:// server turns TLS on without --tls.
    let mut args = vec![
        "status".to_owned(),
        "--tls-ca-cert-files".to_owned(),
        pki.arg("ca.pem"),
    ];
    args.extend(identity.iter().cloned());
    args.extend(["--server".to_owned(), format!("https://{addr}")]);
    assert_status_ok(&lumen(&args));

    // Several CA files, comma separated and repeated; the unrelated one does no harm.
    let cas = format!("{},{}", pki.arg("other-ca.pem"), pki.arg("ca.pem"));
    let mut rest = vec![
        "--tls".to_owned(),
        "--tls-ca-cert-files".to_owned(),
        cas,
        "--tls-ca-cert-files".to_owned(),
        pki.arg("other-ca.pem"),
    ];
    rest.extend(identity.iter().cloned());
    assert_status_ok(&lumen(&with_server(&["status"], &rest, &addr)));

    // The name checked is the host of --server (127.0.0.1, in the certificate) unless
    // --tls-server-name says otherwise.
    let mut named = pki.client_flags();
    named.extend([
        "--tls-server-name".to_owned(),
        "observer.lumen.test".to_owned(),
    ]);
    assert_status_ok(&lumen(&with_server(&["status"], &named, &addr)));
    let mut wrong = pki.client_flags();
    wrong.extend([
        "--tls-server-name".to_owned(),
        "other.lumen.test".to_owned(),
    ]);
    let err = one_line_failure(&lumen(&with_server(&["status"], &wrong, &addr)));
    assert!(
        err.starts_with(&format!(
            "lumen: cannot connect to {addr}: TLS handshake failed: invalid peer certificate: certificate not valid for name \"other.lumen.test\""
        )),
        "{err}"
    );
    assert!(err.ends_with("(see --tls-server-name)"), "{err}");

    // The same flags from the environment.
    let (ca, cert, key) = (
        pki.arg("ca.pem"),
        pki.arg("cli.pem"),
        pki.arg("cli-key.pem"),
    );
    let out = lumen_env(
        &["status"],
        &[
            ("LUMEN_SERVER", addr.as_str()),
            ("LUMEN_TLS", "true"),
            ("LUMEN_TLS_CA_CERT_FILES", ca.as_str()),
            ("LUMEN_TLS_CLIENT_CERT_FILE", cert.as_str()),
            ("LUMEN_TLS_CLIENT_KEY_FILE", key.as_str()),
            ("LUMEN_TLS_SERVER_NAME", "observer.lumen.test"),
        ],
    );
    assert_status_ok(&out);
}

#[test]
fn without_ca_files_the_system_store_is_used() {
    let pki = Pki::new();
    let addr = start_server(Some(pki.mtls_server())).to_string();
    let rest = [
        "--tls".to_owned(),
        "--tls-client-cert-file".to_owned(),
        pki.arg("cli.pem"),
        "--tls-client-key-file".to_owned(),
        pki.arg("cli-key.pem"),
    ];
    let args = with_server(&["status"], &rest, &addr);
    // SSL_CERT_FILE stands in for the system store.
    let ca = pki.arg("ca.pem");
    assert_status_ok(&lumen_env(&args, &[("SSL_CERT_FILE", ca.as_str())]));
    let other = pki.arg("other-ca.pem");
    let err = one_line_failure(&lumen_env(&args, &[("SSL_CERT_FILE", other.as_str())]));
    assert!(
        err.starts_with(&format!(
            "lumen: cannot connect to {addr}: TLS handshake failed: invalid peer certificate: UnknownIssuer"
        )),
        "{err}"
    );
    // An empty system store is an error that says what to do.
    let empty = pki.path("empty.pem");
    std::fs::write(&empty, "").expect("write");
    let empty = empty.display().to_string();
    let err = one_line_failure(&lumen_env(&args, &[("SSL_CERT_FILE", empty.as_str())]));
    assert!(
        err.starts_with("lumen: no CA certificates in the system store"),
        "{err}"
    );
    assert!(err.ends_with("give --tls-ca-cert-files"), "{err}");
}

#[test]
fn allow_insecure_skips_the_chain_and_name_but_not_the_client_certificate() {
    let pki = Pki::new();
    let addr = start_server(Some(pki.mtls_server())).to_string();
    let rest = [
        "--tls-allow-insecure".to_owned(),
        "--tls".to_owned(),
        "--tls-server-name".to_owned(),
        "anything.example".to_owned(),
        "--tls-client-cert-file".to_owned(),
        pki.arg("cli.pem"),
        "--tls-client-key-file".to_owned(),
        pki.arg("cli-key.pem"),
    ];
    assert_status_ok(&lumen(&with_server(&["status"], &rest, &addr)));
    // No CA trusts the server here, and none is needed.
    assert_status_ok(&lumen_env(
        &with_server(&["status"], &rest, &addr),
        &[("SSL_CERT_FILE", "/nonexistent")],
    ));
    // The server still requires the client's certificate.
    let err = one_line_failure(&lumen(&with_server(&["status"], &rest[..4], &addr)));
    assert!(err.contains("CertificateRequired"), "{err}");
}

#[test]
fn tls_failures_are_one_line_errors() {
    let pki = Pki::new();
    let addr = start_server(Some(pki.mtls_server())).to_string();
    let prefix = format!("lumen: cannot connect to {addr}: ");

    // Plaintext against the TLS server.
    for cmd in ["status", "observe", "nodes"] {
        let err = one_line_failure(&lumen(&with_server(&[cmd], &[], &addr)));
        assert!(err.starts_with(&prefix), "{cmd}: {err}");
        assert!(
            err.ends_with(" (if the server uses TLS, add --tls)"),
            "{cmd}: {err}"
        );
    }

    // A CA that did not sign the server's certificate.
    let mut wrong_ca = pki.client_flags();
    wrong_ca[2] = pki.arg("other-ca.pem");
    for cmd in ["status", "observe", "nodes"] {
        let err = one_line_failure(&lumen(&with_server(&[cmd], &wrong_ca, &addr)));
        assert_eq!(
            err,
            format!("{prefix}TLS handshake failed: invalid peer certificate: UnknownIssuer (the server's certificate is not signed by a CA in --tls-ca-cert-files or the system store)"),
            "{cmd}"
        );
    }

    // No client certificate for a server that requires one. The server says so after
    // the client's side of the handshake, racing the first call; the message must not
    // depend on who wins, hence the repeats.
    let no_identity = &pki.client_flags()[..3];
    for cmd in ["status", "observe", "nodes", "status", "observe", "nodes"] {
        let err = one_line_failure(&lumen(&with_server(&[cmd], no_identity, &addr)));
        assert_eq!(
            err,
            format!("{prefix}TLS handshake failed: received fatal alert: CertificateRequired (the server requires a client certificate: see --tls-client-cert-file)"),
            "{cmd}"
        );
    }

    // TLS against a plaintext server.
    let plain = start_server(None).to_string();
    let err = one_line_failure(&lumen(&with_server(
        &["status"],
        &pki.client_flags(),
        &plain,
    )));
    assert!(
        err.starts_with(&format!(
            "lumen: cannot connect to {plain}: TLS handshake failed: "
        )),
        "{err}"
    );
}

#[test]
fn bad_tls_flags_name_the_flag_and_the_path() {
    let pki = Pki::new();
    // Nothing listens here: these fail before connecting.
    let addr = "127.0.0.1:1";
    let missing = pki.arg("missing.pem");

    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec![
                "--tls".into(),
                "--tls-client-cert-file".into(),
                pki.arg("cli.pem"),
            ],
            "lumen: --tls-client-cert-file and --tls-client-key-file go together: --tls-client-key-file is missing".into(),
        ),
        (
            vec![
                "--tls".into(),
                "--tls-client-key-file".into(),
                pki.arg("cli-key.pem"),
            ],
            "lumen: --tls-client-cert-file and --tls-client-key-file go together: --tls-client-cert-file is missing".into(),
        ),
        (
            vec!["--tls".into(), "--tls-ca-cert-files".into(), missing.clone()],
            format!("lumen: --tls-ca-cert-files {missing}: no such file or directory"),
        ),
        (
            vec![
                "--tls".into(),
                "--tls-ca-cert-files".into(),
                pki.arg("cli-key.pem"),
            ],
            format!(
                "lumen: --tls-ca-cert-files {}: no PEM certificate in the file",
                pki.arg("cli-key.pem")
            ),
        ),
        (
            vec![
                "--tls".into(),
                "--tls-ca-cert-files".into(),
                pki.arg("ca.pem"),
                "--tls-client-cert-file".into(),
                pki.arg("cli.pem"),
                "--tls-client-key-file".into(),
                pki.arg("cli.pem"),
            ],
            format!(
                "lumen: --tls-client-key-file {}: no PEM private key in the file",
                pki.arg("cli.pem")
            ),
        ),
        (
            vec![
                "--tls".into(),
                "--tls-ca-cert-files".into(),
                pki.arg("ca.pem"),
                "--tls-client-cert-file".into(),
                missing.clone(),
                "--tls-client-key-file".into(),
                pki.arg("cli-key.pem"),
            ],
            format!("lumen: --tls-client-cert-file {missing}: no such file or directory"),
        ),
        (
            vec![
                "--tls".into(),
                "--tls-client-cert-file".into(),
                pki.arg("cli.pem"),
                "--tls-client-key-file".into(),
                pki.arg("server-key.pem"),
            ],
            format!(
                "lumen: --tls-client-key-file {}: not the key of --tls-client-cert-file {}: keys may not be consistent: KeyMismatch",
                pki.arg("server-key.pem"),
                pki.arg("cli.pem")
            ),
        ),
    ];
    for (rest, want) in cases {
        let out = lumen(&with_server(&["status"], &rest, addr));
        assert_eq!(out.status.code(), Some(2), "{rest:?}");
        assert_eq!(one_line_failure(&out), want, "{rest:?}");
    }

    // A directory instead of a file.
    let dir = pki.dir.path().display().to_string();
    let out = lumen(&with_server(
        &["observe"],
        &["--tls".into(), "--tls-ca-cert-files".into(), dir.clone()],
        addr,
    ));
    let err = one_line_failure(&out);
    assert!(
        err.starts_with(&format!("lumen: --tls-ca-cert-files {dir}: ")),
        "{err}"
    );

    // --tls and an http:// server contradict each other.
    let out = lumen(&["status", "--tls", "--server", "http://127.0.0.1:1"]);
    assert_eq!(
        one_line_failure(&out),
        "lumen: --tls needs an https:// server or host:port, not http://127.0.0.1:1"
    );

    // Without TLS the other flags are not read (as in Hubble): a plaintext connection.
    let out = lumen(&with_server(
        &["status"],
        &["--tls-ca-cert-files".into(), missing],
        addr,
    ));
    assert!(one_line_failure(&out).contains("connection refused"));
}
