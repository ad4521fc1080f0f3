//! Receive coalescing on the WAL stream: few large socket reads while the
//! walsender is busy, immediate reads while it is quiet.
//!
//! The walsender flushes its socket after every pgoutput message, so a reader
//! that keeps up is woken once per change: an epoll wake-up, a context switch,
//! a `recvfrom` and a TLS record each time, on both sides of the socket (the
//! walsender pays for waking us too). On a 2-core machine that was about 40% of
//! `odoo-cdc tail`'s CPU (perf: `epoll_wait`, `finish_task_switch`,
//! `recvfrom`), and pg_recvlogical pays the same.
//!
//! So while reads come back large, the reader raises the socket's
//! `SO_RCVLOWAT` to [`LOWAT`]: Linux then neither reports the socket readable
//! nor wakes anyone until that many bytes are queued (`tcp_data_ready`). A
//! wait is bounded by [`MAX_WAIT`]: when it expires the reader lowers
//! `SO_RCVLOWAT` to 1, which makes the kernel signal whatever is queued at once
//! (`tcp_set_rcvlowat` calls `tcp_data_ready`), reads it, and goes back to
//! plain per-message reads if the stream has gone quiet. A quiet stream is
//! never delayed; a busy one by at most [`MAX_WAIT`] (plus the timer's 1 ms
//! resolution). Kafka consumers do the same with `fetch.min.bytes` and
//! `fetch.max.wait.ms`.
//!
//! Only the socket option changes: no byte is held back in user space, and a
//! failed `setsockopt` only turns coalescing off (logged once).

use std::os::fd::RawFd;
use std::time::Duration;

/// Bytes the kernel queues before it wakes a busy reader.
pub(crate) const LOWAT: usize = 32 * 1024;
/// Longest a busy reader waits for [`LOWAT`] bytes before taking what is there.
pub(crate) const MAX_WAIT: Duration = Duration::from_millis(2);
/// A read at least this large means the walsender is streaming faster than we
/// wake up: switch to coalesced reads. Smaller reads switch back.
pub(crate) const BUSY_READ: usize = 8 * 1024;

/// Per-socket coalescing state, owned by the reader of that socket.
#[derive(Debug)]
pub(crate) struct Coalescer {
    /// The TCP socket; it lives as long as the stream the reader owns.
    fd: RawFd,
    /// Whether `SO_RCVLOWAT` is currently raised to [`LOWAT`].
    raised: bool,
    /// Set after a failed `setsockopt`: coalescing is off for this socket.
    disabled: bool,
}

impl Coalescer {
    /// `fd` must be the connected TCP socket the reader reads, and stay open
    /// as long as this value is used (the reader owns the stream).
    pub(crate) fn new(fd: RawFd) -> Self {
        Coalescer {
            fd,
            raised: false,
            disabled: false,
        }
    }

    /// How long the next read may wait for [`LOWAT`] bytes; `None` for a
    /// plain read (the stream is quiet, or coalescing is off).
    pub(crate) fn max_wait(&self) -> Option<Duration> {
        self.raised.then_some(MAX_WAIT)
    }

    /// The wait expired with fewer than [`LOWAT`] bytes queued: let them through.
    pub(crate) fn release(&mut self) {
        self.set(false);
    }

    /// A read returned `n` bytes: pick the mode of the next one.
    pub(crate) fn observe(&mut self, n: usize) {
        self.set(n >= BUSY_READ);
    }

    fn set(&mut self, raise: bool) {
        if self.disabled || raise == self.raised {
            return;
        }
        let value = if raise { LOWAT } else { 1 };
        match set_rcvlowat(self.fd, value) {
            Ok(()) => self.raised = raise,
            Err(e) => {
                tracing::warn!(error = %e, "setsockopt(SO_RCVLOWAT) failed; reading the WAL stream without coalescing");
                self.disabled = true;
                if self.raised {
                    // Best effort: never leave the socket waiting for LOWAT bytes.
                    let _ = set_rcvlowat(self.fd, 1);
                    self.raised = false;
                }
            }
        }
    }
}

fn set_rcvlowat(fd: RawFd, bytes: usize) -> std::io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fd` is an open socket owned by the caller's stream for the
    // duration of the call; the option value is a c_int passed by pointer with
    // its exact size, as setsockopt(2) requires.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    fn rcvlowat(fd: RawFd) -> libc::c_int {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&raw mut value).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        value
    }

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn large_reads_raise_the_low_water_mark_and_small_ones_or_a_release_lower_it() {
        let (rx, _tx) = pair();
        let mut c = Coalescer::new(rx.as_raw_fd());
        assert_eq!(c.max_wait(), None);
        c.observe(BUSY_READ - 1);
        assert_eq!(rcvlowat(rx.as_raw_fd()), 1);
        c.observe(BUSY_READ);
        assert_eq!(rcvlowat(rx.as_raw_fd()), LOWAT as libc::c_int);
        assert_eq!(c.max_wait(), Some(MAX_WAIT));
        c.release();
        assert_eq!(rcvlowat(rx.as_raw_fd()), 1);
        assert_eq!(c.max_wait(), None);
        c.observe(100 * 1024);
        c.observe(10);
        assert_eq!(rcvlowat(rx.as_raw_fd()), 1);
    }

    /// The property the reader relies on: with the mark raised, a few queued
    /// bytes do not make the socket readable; lowering it does, at once.
    #[test]
    fn lowering_the_mark_makes_queued_bytes_readable() {
        let (rx, mut tx) = pair();
        let mut c = Coalescer::new(rx.as_raw_fd());
        c.observe(BUSY_READ);
        tx.write_all(b"hello").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut fds = libc::pollfd {
            fd: rx.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1.
        let ready = unsafe { libc::poll(&raw mut fds, 1, 0) };
        assert_eq!(ready, 0, "readable below SO_RCVLOWAT");
        c.release();
        // SAFETY: as above.
        let ready = unsafe { libc::poll(&raw mut fds, 1, 1000) };
        assert_eq!(ready, 1, "not readable after lowering SO_RCVLOWAT");
        let mut buf = [0u8; 16];
        let mut rx = rx;
        assert_eq!(rx.read(&mut buf).unwrap(), 5);
    }

    #[test]
    fn a_bad_socket_turns_coalescing_off_instead_of_failing_reads() {
        let mut c = Coalescer::new(-1);
        c.observe(BUSY_READ);
        assert!(c.disabled);
        assert_eq!(c.max_wait(), None);
    }
}
