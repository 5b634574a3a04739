//! Lumen's network lab: "pods" (network namespaces on veth pairs) on one Linux bridge or on
//! "nodes" (network namespaces of their own, routing for their pods), traffic helpers, and
//! packet capture parsed independently of Lumen, for privileged end-to-end tests and
//! `cargo xtask demo`.
//!
//! Topology of one [`Lab`] (id = 5 characters of `[0-9a-z]`, unique per lab), with pods on
//! the bridge ([`Lab::add_pod`]):
//!
//! ```text
//!  root namespace                                  pod namespaces
//!  bridge lmb<id>  10.x.y.1/24  fd00:6c6d:xxyy::1/64
//!    ├─ lmh<id>2 ══ veth ══ eth0 in lmn-<id>-<pod>  10.x.y.2/24  fd00:6c6d:xxyy::2/64
//!    └─ lmh<id>3 ══ veth ══ eth0 in lmn-<id>-<pod>  10.x.y.3/24  …
//! ```
//!
//! Pods reach each other over the bridge (pure L2) and use the bridge addresses as default
//! gateways.
//!
//! With nodes ([`Lab::add_node`], [`Lab::add_pod_on`]), addresses still come from the lab's
//! one `/24` and `/64`, in creation order:
//!
//! ```text
//!  root namespace              node namespaces                        pod namespaces
//!  bridge lmb<id> 10.x.y.1/24
//!    ├─ lmh<id>2 ══ eth0 in lmnode-<id>-<node>  10.x.y.2/24  ::2/64
//!    │                ├─ lmh<id>4 (fe80::1) ══ eth0 in lmn-<id>-<pod>  10.x.y.4/32  ::4/128
//!    │                └─ lmh<id>5 (fe80::1) ══ eth0 in lmn-<id>-<pod>  10.x.y.5/32  ::5/128
//!    └─ lmh<id>3 ══ eth0 in lmnode-<id>-<node>  10.x.y.3/24  ::3/64
//!                     └─ lmh<id>6 (fe80::1) ══ eth0 in lmn-<id>-<pod>  10.x.y.6/32  ::6/128
//! ```
//!
//! A node forwards (its own namespace's sysctls) and routes each of its pods to its host-side
//! veth; the pods' default routes lead to the node (IPv4 via the node's address, IPv6 via
//! `fe80::1` on the host side). Every other node, and the root namespace, route each pod's
//! `/32` and `/128` via its node's address on the bridge, so pod to pod across nodes is
//! routed by both nodes, and the root namespace reaches every node and pod. A program that
//! belongs on a node (a node exporter) runs in its namespace ([`Node::spawn`]) and listens
//! on the node's address.
//!
//! Nothing global is changed: no sysctl or forwarding in the root namespace, only the lab's
//! own links, namespaces, addresses and routes; `x` is in 200..250 and `x.y` avoids every
//! route on the host.
//!
//! Everything here needs root; gate tests with [`require_privileges`].

mod attach;
mod capture;
mod cmd;
mod conn;
mod lab;
mod names;
mod netns;
mod node;
mod packet;
mod pcap;
mod pod;
mod privileges;

pub use attach::{
    attachments, attachments_in, has_clsact, tc_filters, tcx_programs, xdp_program, Attachments,
};
pub use capture::{Capture, CaptureOptions, CaptureResult, CaptureStats};
pub use conn::{connections, Connection, FiveTuple};
pub use lab::{Lab, LabInfo, Owner};
pub use node::Node;
pub use packet::{ipproto, CapturedPacket, Direction, TcpFlags, L3, L4};
pub use pod::{http_url, Background, ConnectOutcome, PingStats, Pod};
pub use privileges::{privilege_check, privileged_tests_required, require_privileges};
