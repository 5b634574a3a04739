//! Lumen's network lab: "pods" (network namespaces on veth pairs) on one Linux bridge, traffic
//! helpers, and packet capture parsed independently of Lumen, for privileged end-to-end tests and
//! `cargo xtask demo`.
//!
//! Topology of one [`Lab`] (id = 5 characters of `[0-9a-z]`, unique per lab):
//!
//! ```text
//!  root namespace                                  pod namespaces
//!  bridge lmb<id>  10.x.y.1/24  fd00:6c6d:xxyy::1/64
//!    ├─ lmh<id>2 ══ veth ══ eth0 in lmn-<id>-<pod>  10.x.y.2/24  fd00:6c6d:xxyy::2/64
//!    └─ lmh<id>3 ══ veth ══ eth0 in lmn-<id>-<pod>  10.x.y.3/24  …
//! ```
//!
//! Pods reach each other over the bridge (pure L2) and use the bridge addresses as default
//! gateways. Nothing global is changed: no sysctl, no forwarding, only the lab's own links,
//! namespaces and addresses; `x` is in 200..250 and `x.y` avoids every route on the host.
//!
//! Everything here needs root; gate tests with [`require_privileges`].

mod attach;
mod capture;
mod cmd;
mod conn;
mod lab;
mod names;
mod packet;
mod pcap;
mod pod;
mod privileges;

pub use attach::{attachments, has_clsact, tc_filters, tcx_programs, xdp_program, Attachments};
pub use capture::{Capture, CaptureOptions, CaptureResult, CaptureStats};
pub use conn::{connections, Connection, FiveTuple};
pub use lab::{Lab, LabInfo, Owner};
pub use packet::{ipproto, CapturedPacket, Direction, TcpFlags, L3, L4};
pub use pod::{http_url, Background, ConnectOutcome, PingStats, Pod};
pub use privileges::{privilege_check, privileged_tests_required, require_privileges};
