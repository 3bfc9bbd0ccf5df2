//! Batched datagram I/O: `recvmmsg` / `sendmmsg` on Linux (one system call for up to
//! [`BATCH`] datagrams), one datagram per call elsewhere; and, for load generators,
//! [`send_segmented`] (UDP segmentation offload: one trip down the network stack for a
//! run of equal-sized datagrams, which receivers still get one by one).

use std::io;
use std::net::SocketAddr;

use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::MAX_DATAGRAM;

/// Datagrams per system call.
pub const BATCH: usize = 64;
/// The most bytes one UDP datagram carries over IPv4 (a segmented send's whole buffer).
const MAX_UDP_PAYLOAD: usize = 65_507;
/// Room per datagram: one byte more than the longest accepted, so a longer one shows.
pub const SLOT: usize = MAX_DATAGRAM + 1;

/// Buffers for one batched receive, reused.
pub struct RecvBatch {
    bufs: Vec<u8>,
    lens: Vec<usize>,
    from: Vec<SocketAddr>,
    #[cfg(target_os = "linux")]
    sys: linux::Headers,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: vec![0; BATCH * SLOT],
            lens: vec![0; BATCH],
            from: vec![SocketAddr::from(([0, 0, 0, 0], 0)); BATCH],
            #[cfg(target_os = "linux")]
            sys: linux::Headers::default(),
        }
    }
}

impl RecvBatch {
    /// Datagram `i` of the last receive and its sender.
    pub fn get(&self, i: usize) -> (&[u8], SocketAddr) {
        (&self.bufs[i * SLOT..i * SLOT + self.lens[i]], self.from[i])
    }

    /// Receives what is waiting, up to [`BATCH`] datagrams, without blocking
    /// (`WouldBlock` when nothing is).
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        #[cfg(target_os = "linux")]
        {
            let RecvBatch { bufs, lens, from, sys } = self;
            sock.try_io(Interest::READABLE, || sys.recv(sock, bufs, lens, from))
        }
        #[cfg(not(target_os = "linux"))]
        {
            let (n, a) = sock.try_recv_from(&mut self.bufs[..SLOT])?;
            self.lens[0] = n;
            self.from[0] = a;
            Ok(1)
        }
    }
}

/// Sends datagrams to one address, batched, waiting while the socket's buffer is full;
/// returns how many the kernel took (all, unless an error came after some).
pub async fn send_all(sock: &UdpSocket, to: SocketAddr, datagrams: &[Vec<u8>]) -> io::Result<usize> {
    let mut sent = 0;
    while sent < datagrams.len() {
        sock.writable().await?;
        match send_some(sock, to, &datagrams[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if sent == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(sent)
}

/// Sends datagrams to one address as [`send_all`] does, but with UDP segmentation
/// offload where the kernel has it (Linux `UDP_SEGMENT`): a run of up to [`BATCH`]
/// datagrams of one size goes down the sender's network stack as one buffer, and the
/// kernel cuts it back into the same datagrams before the receiving socket sees them
/// (a receiver without `UDP_GRO`, as a node is, reads them one by one). What it saves
/// is the sender's work per datagram: the benchmark's client stands in for many phones,
/// whose sending costs the node nothing. Falls back to [`send_all`] when the kernel
/// refuses it.
pub async fn send_segmented(sock: &UdpSocket, to: SocketAddr, datagrams: &[Vec<u8>]) -> io::Result<usize> {
    #[cfg(target_os = "linux")]
    {
        let mut buf = Vec::with_capacity(BATCH * SLOT);
        let mut sent = 0;
        while sent < datagrams.len() {
            sock.writable().await?;
            match sock.try_io(Interest::WRITABLE, || linux::send_segmented(sock, to, &datagrams[sent..], &mut buf)) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // No segmentation offload here (an old kernel, or a device without it).
                Err(e) if sent == 0 && matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL)) => {
                    return Ok(sent + send_all(sock, to, &datagrams[sent..]).await?);
                }
                Err(e) if sent == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(sent)
    }
    #[cfg(not(target_os = "linux"))]
    {
        send_all(sock, to, datagrams).await
    }
}

fn send_some(sock: &UdpSocket, to: SocketAddr, datagrams: &[Vec<u8>]) -> io::Result<usize> {
    #[cfg(target_os = "linux")]
    {
        sock.try_io(Interest::WRITABLE, || linux::send(sock, to, datagrams))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let mut n = 0;
        for d in datagrams {
            match sock.try_send_to(d, to) {
                Ok(_) => n += 1,
                Err(e) if n == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(n)
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::AsRawFd;

    use tokio::net::UdpSocket;

    use super::{BATCH, SLOT};

    /// The kernel's view of a batch: headers and addresses (rebuilt per call, pointing
    /// into the caller's buffers, so nothing self-referential is kept).
    pub struct Headers {
        addrs: Vec<libc::sockaddr_storage>,
    }

    impl Default for Headers {
        fn default() -> Self {
            // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
            Headers { addrs: vec![unsafe { std::mem::zeroed() }; BATCH] }
        }
    }

    fn to_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
        match s.ss_family as i32 {
            libc::AF_INET => {
                // SAFETY: the family says this storage holds a sockaddr_in.
                let a = unsafe { &*(s as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
                let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says this storage holds a sockaddr_in6.
                let a = unsafe { &*(s as *const libc::sockaddr_storage as *const libc::sockaddr_in6) };
                let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
                Some(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(a.sin6_port), a.sin6_flowinfo, a.sin6_scope_id)))
            }
            _ => None,
        }
    }

    fn from_addr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: plain data, zero is valid.
        let mut s: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match a {
            SocketAddr::V4(v4) => {
                // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
                let p = unsafe { &mut *(&mut s as *mut libc::sockaddr_storage as *mut libc::sockaddr_in) };
                p.sin_family = libc::AF_INET as libc::sa_family_t;
                p.sin_port = v4.port().to_be();
                p.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(v6) => {
                // SAFETY: as above, for sockaddr_in6.
                let p = unsafe { &mut *(&mut s as *mut libc::sockaddr_storage as *mut libc::sockaddr_in6) };
                p.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                p.sin6_port = v6.port().to_be();
                p.sin6_addr.s6_addr = v6.ip().octets();
                p.sin6_flowinfo = v6.flowinfo();
                p.sin6_scope_id = v6.scope_id();
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (s, len as libc::socklen_t)
    }

    impl Headers {
        pub fn recv(
            &mut self,
            sock: &UdpSocket,
            bufs: &mut [u8],
            lens: &mut [usize],
            from: &mut [SocketAddr],
        ) -> io::Result<usize> {
            let mut iov: Vec<libc::iovec> = bufs
                .chunks_exact_mut(SLOT)
                .map(|c| libc::iovec { iov_base: c.as_mut_ptr().cast(), iov_len: SLOT })
                .collect();
            // SAFETY: mmsghdr is plain data; zero is a valid (empty) header.
            let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
            let (iov_p, addrs_p) = (iov.as_mut_ptr(), self.addrs.as_mut_ptr());
            for (i, h) in hdrs.iter_mut().enumerate() {
                // A sender the kernel does not fill in reads as no address, not the last.
                self.addrs[i].ss_family = 0;
                // SAFETY: i < BATCH, the length of both vectors.
                h.msg_hdr.msg_iov = unsafe { iov_p.add(i) };
                h.msg_hdr.msg_iovlen = 1;
                h.msg_hdr.msg_name = unsafe { addrs_p.add(i) }.cast();
                h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            }
            // SAFETY: every header points at live buffers of the stated sizes (iov, the
            // slots of `bufs`, and `addrs`) for the duration of the call.
            let n = unsafe {
                libc::recvmmsg(
                    sock.as_raw_fd(),
                    hdrs.as_mut_ptr(),
                    BATCH as _,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            for i in 0..n {
                // A datagram longer than the slot is cut: keep the full slot, which is
                // longer than any accepted datagram, so it is refused as too long.
                let truncated = hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
                lens[i] = if truncated { SLOT } else { hdrs[i].msg_len as usize };
                from[i] = to_addr(&self.addrs[i]).unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
            }
            Ok(n)
        }
    }

    pub fn send(sock: &UdpSocket, to: SocketAddr, datagrams: &[Vec<u8>]) -> io::Result<usize> {
        let (mut addr, addr_len) = from_addr(to);
        let mut sent = 0;
        for chunk in datagrams.chunks(BATCH) {
            let mut iov: Vec<libc::iovec> =
                chunk.iter().map(|d| libc::iovec { iov_base: d.as_ptr() as *mut _, iov_len: d.len() }).collect();
            // SAFETY: plain data, zero is valid.
            let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; chunk.len()];
            let iov_p = iov.as_mut_ptr();
            for (i, h) in hdrs.iter_mut().enumerate() {
                // SAFETY: i < chunk.len(), the length of `iov`.
                h.msg_hdr.msg_iov = unsafe { iov_p.add(i) };
                h.msg_hdr.msg_iovlen = 1;
                h.msg_hdr.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_namelen = addr_len;
            }
            // SAFETY: the headers point at live datagrams and one address for the call;
            // the kernel only reads them.
            let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), hdrs.as_mut_ptr(), hdrs.len() as _, libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return if sent == 0 { Err(e) } else { Ok(sent) };
            }
            sent += n as usize;
            if (n as usize) < chunk.len() {
                break;
            }
        }
        Ok(sent)
    }

    /// One run of equal-sized datagrams from the start of `datagrams` (up to [`BATCH`])
    /// in one `sendmsg` with a `UDP_SEGMENT` size; how many were sent.
    pub fn send_segmented(
        sock: &UdpSocket,
        to: SocketAddr,
        datagrams: &[Vec<u8>],
        buf: &mut Vec<u8>,
    ) -> io::Result<usize> {
        let Some(first) = datagrams.first() else { return Ok(0) };
        let size = first.len();
        buf.clear();
        // At most BATCH segments, and one UDP payload's worth of bytes in all.
        let most = BATCH.min(super::MAX_UDP_PAYLOAD / size.max(1));
        let run = datagrams.iter().take(most).take_while(|d| d.len() == size && size > 0).count().max(1);
        for d in &datagrams[..run] {
            buf.extend_from_slice(d);
        }
        let (mut addr, addr_len) = from_addr(to);
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // Room for one control message holding a u16, aligned as cmsghdr wants.
        let mut control = [0u64; 4];
        // SAFETY: plain data, zero is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut addr as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = addr_len;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if run > 1 {
            // SAFETY: CMSG_SPACE of a u16 (24 bytes) fits `control` (32), which outlives
            // the call; the header and its data are written inside it.
            unsafe {
                let space = libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize;
                debug_assert!(space <= std::mem::size_of_val(&control));
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = space as _;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size as u16);
            }
        }
        // SAFETY: the header points at the live buffer, address and control message.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(run)
    }

    /// Asks for a large receive buffer: beyond `net.core.rmem_max` when the process may
    /// (`SO_RCVBUFFORCE`, with `CAP_NET_ADMIN`), else as much as the kernel allows. The
    /// size the socket got, as the kernel counts it (twice what is asked, for its
    /// bookkeeping).
    pub fn set_recv_buffer(sock: &UdpSocket, bytes: usize) -> usize {
        let v = bytes.min(i32::MAX as usize / 2) as libc::c_int;
        let set = |opt| {
            // SAFETY: a valid fd and a c_int option value of the stated size.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(libc::SO_RCVBUFFORCE) != 0 {
            set(libc::SO_RCVBUF);
        }
        let mut got: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid fd, and room for the c_int the kernel writes.
        let r = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&mut got as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r == 0 { got.max(0) as usize } else { 0 }
    }
}

/// Asks for a large receive buffer, so bursts wait in the kernel rather than drop;
/// the size the socket got (0 where unknown).
pub fn set_recv_buffer(sock: &UdpSocket, bytes: usize) -> usize {
    #[cfg(target_os = "linux")]
    return linux::set_recv_buffer(sock, bytes);
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (sock, bytes);
        0
    }
}
