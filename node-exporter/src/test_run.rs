//! BPF_PROG_TEST_RUN for TC programs: run a loaded program on a packet buffer in the
//! kernel `repeat` times and read back its return value and the mean time per run. Used by
//! the datapath benchmarks and the differential tests.

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (kernel ABI, fixed layout).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// Result of a test run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value (TC action).
    pub retval: i32,
    /// Mean kernel time per run, ns (as the kernel measures it).
    pub duration_ns: u32,
}

/// Run `prog` over `packet` (an Ethernet frame) `repeat` times.
pub fn run(prog: BorrowedFd<'_>, packet: &[u8], repeat: u32) -> std::io::Result<TestRun> {
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: repeat.max(1),
        ..TestRunAttr::default()
    };
    // SAFETY: attr is a valid, fully initialised bpf_attr prefix; the buffers it points to
    // outlive the call and their sizes are given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(TestRun {
        retval: attr.retval as i32,
        duration_ns: attr.duration,
    })
}

/// Packet builders for test runs: Ethernet + IPv4/IPv6 + TCP/UDP with the given fields.
pub mod packets {
    use std::net::IpAddr;

    fn eth(ethertype: u16) -> Vec<u8> {
        let mut p = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
        p.extend_from_slice(&ethertype.to_be_bytes());
        p
    }

    /// A TCP segment with `flags` and `payload` bytes of zeros.
    pub fn tcp(
        src: IpAddr,
        dst: IpAddr,
        sport: u16,
        dport: u16,
        flags: u8,
        payload: usize,
    ) -> Vec<u8> {
        let mut l4 = Vec::with_capacity(20 + payload);
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        l4.extend_from_slice(&1u32.to_be_bytes());
        l4.extend_from_slice(&0u32.to_be_bytes());
        l4.push(5 << 4);
        l4.push(flags);
        l4.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        l4.resize(20 + payload, 0);
        ip(src, dst, 6, &l4)
    }

    /// A UDP datagram with `payload` bytes of zeros.
    pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: usize) -> Vec<u8> {
        let mut l4 = Vec::with_capacity(8 + payload);
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        l4.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        l4.resize(8 + payload, 0);
        ip(src, dst, 17, &l4)
    }

    fn ip(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut p = eth(0x0800);
                let total = (20 + l4.len()) as u16;
                p.extend_from_slice(&[0x45, 0]);
                p.extend_from_slice(&total.to_be_bytes());
                p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                p.extend_from_slice(l4);
                p
            }
            (s, d) => {
                let to6 = |a: IpAddr| match a {
                    IpAddr::V4(v) => v.to_ipv6_mapped(),
                    IpAddr::V6(v) => v,
                };
                let mut p = eth(0x86dd);
                p.extend_from_slice(&[0x60, 0, 0, 0]);
                p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                p.extend_from_slice(&[proto, 64]);
                p.extend_from_slice(&to6(s).octets());
                p.extend_from_slice(&to6(d).octets());
                p.extend_from_slice(l4);
                p
            }
        }
    }
}
