//! The desktop's pipes to the agent, with every wait bounded.
//!
//! A peer can stop answering while keeping its end open: a server that hangs
//! on a dead disk, an agent stopped by a debugger, a network that drops
//! packets while ssh's keepalives are not due yet. A plain blocking `read`
//! would then wait forever, and with it the whole run. So the descriptors are
//! non-blocking, and each wait is a `poll` in short ticks, after each of
//! which three things are looked at:
//!
//! - the idle timeout (`io_timeout`): a read fails once nothing arrived for
//!   that long *and* nothing could be sent either — a restore's agent may
//!   stay silent for as long as the desktop streams a large file to it — and a
//!   write fails once the peer took nothing for that long;
//! - [`Link::close`], by which the session ends a connection it gave up on,
//!   so that no thread stays blocked on it and shutdown never waits for one;
//! - a SIGINT or SIGTERM ([`crate::interrupt`]), which must reach whichever
//!   thread is waiting.
//!
//! Once one side has failed the link is closed, so the other side (a writer
//! blocked on a full pipe, say) gives up at its next tick too.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::OFlags;

/// How often a wait looks at the timeout, the close flag and signals.
const TICK: Duration = Duration::from_millis(200);

/// A connection to one peer, shared by its reading and writing halves.
pub struct Link {
    /// Who the peer is, for messages ("the agent on backupuser@server").
    peer: String,
    /// The idle timeout; `None` waits forever.
    timeout: Option<Duration>,
    epoch: Instant,
    /// When data last moved each way, in milliseconds since `epoch`.
    last_read: AtomicU64,
    last_write: AtomicU64,
    closed: AtomicBool,
}

/// Why a read or write on a link failed by itself.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("no data from {peer} for {secs} s (io_timeout)")]
    NoData { peer: String, secs: u64 },
    #[error("{peer} took no data for {secs} s (io_timeout)")]
    NotReading { peer: String, secs: u64 },
    #[error("the connection to {peer} was given up")]
    Closed { peer: String },
    /// The peer closed its end while we were writing (`EPIPE`): the same
    /// event as an end of stream when reading, said the same way.
    #[error("{peer} closed the connection ({error})")]
    HungUp { peer: String, error: io::Error },
    /// The pipe itself failed (the peer went away: `ECONNRESET`, …).
    #[error("{what} {peer}: {error}")]
    Io { what: &'static str, peer: String, error: io::Error },
}

impl LinkError {
    /// The link error inside `e`, if `e` came from a link.
    pub fn of(e: &io::Error) -> Option<&LinkError> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<LinkError>())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Read,
    Write,
}

impl Link {
    pub fn new(peer: &str, timeout: Option<Duration>) -> Arc<Link> {
        Arc::new(Link {
            peer: peer.to_string(),
            timeout: timeout.filter(|t| !t.is_zero()),
            epoch: Instant::now(),
            last_read: AtomicU64::new(0),
            last_write: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        })
    }

    /// The reading half over `fd` (made non-blocking: it must be this side's
    /// own end of a pipe or socket).
    pub fn reader(self: &Arc<Self>, fd: impl Into<OwnedFd>) -> io::Result<LinkReader> {
        Ok(LinkReader { file: nonblocking(fd.into())?, link: self.clone() })
    }

    /// The writing half over `fd` (made non-blocking, likewise).
    pub fn writer(self: &Arc<Self>, fd: impl Into<OwnedFd>) -> io::Result<LinkWriter> {
        Ok(LinkWriter { file: nonblocking(fd.into())?, link: self.clone() })
    }

    /// Ends the connection from this side: every wait on it returns an error
    /// within a tick.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn moved(&self, way: Way) {
        let clock = if way == Way::Read { &self.last_read } else { &self.last_write };
        clock.store(self.now(), Ordering::Relaxed);
    }

    fn failed(&self, way: Way, error: io::Error) -> io::Error {
        let peer = self.peer.clone();
        if error.kind() == io::ErrorKind::BrokenPipe {
            return io::Error::new(error.kind(), LinkError::HungUp { peer, error });
        }
        let what = if way == Way::Read { "reading from" } else { "writing to" };
        io::Error::new(error.kind(), LinkError::Io { what, peer, error })
    }

    fn closed_error(&self) -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionAborted, LinkError::Closed { peer: self.peer.clone() })
    }

    /// `Err` if the link was closed or a signal asked the run to stop.
    fn check(&self) -> io::Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(self.closed_error());
        }
        // Not `ErrorKind::Interrupted`: readers retry on that.
        crate::interrupt::check().map_err(io::Error::other)
    }

    /// Waits until `fd` is ready for `way`, within the rules of the module doc.
    fn wait(&self, fd: impl AsFd, way: Way) -> io::Result<()> {
        let flags = if way == Way::Read { PollFlags::IN } else { PollFlags::OUT };
        let tick = Timespec { tv_sec: 0, tv_nsec: TICK.as_nanos() as _ };
        let started = Instant::now();
        loop {
            let mut fds = [PollFd::new(&fd, flags)];
            match rustix::event::poll(&mut fds, Some(&tick)) {
                // Ready, or hung up or failed: the read or write says which.
                Ok(n) if n > 0 => return Ok(()),
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
            self.check()?;
            let Some(timeout) = self.timeout else { continue };
            if started.elapsed() < timeout {
                continue;
            }
            let secs = timeout.as_secs();
            let peer = self.peer.clone();
            let error = match way {
                Way::Write => LinkError::NotReading { peer, secs },
                Way::Read => {
                    let since_write =
                        Duration::from_millis(self.now().saturating_sub(self.last_write.load(Ordering::Relaxed)));
                    if since_write < timeout {
                        continue;
                    }
                    LinkError::NoData { peer, secs }
                }
            };
            self.close();
            return Err(io::Error::new(io::ErrorKind::TimedOut, error));
        }
    }
}

fn nonblocking(fd: OwnedFd) -> io::Result<File> {
    let flags = rustix::fs::fcntl_getfl(&fd)?;
    rustix::fs::fcntl_setfl(&fd, flags | OFlags::NONBLOCK)?;
    Ok(File::from(fd))
}

/// The reading half of a [`Link`].
pub struct LinkReader {
    file: File,
    link: Arc<Link>,
}

impl Read for LinkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.link.check()?;
            match self.file.read(buf) {
                Ok(n) => {
                    if n > 0 {
                        self.link.moved(Way::Read);
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.link.wait(&self.file, Way::Read)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.link.failed(Way::Read, e)),
            }
        }
    }
}

/// The writing half of a [`Link`].
pub struct LinkWriter {
    file: File,
    link: Arc<Link>,
}

impl Write for LinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            self.link.check()?;
            match self.file.write(buf) {
                Ok(n) => {
                    if n > 0 {
                        self.link.moved(Way::Write);
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.link.wait(&self.file, Way::Write)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.link.failed(Way::Write, e)),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_peer_is_a_timeout_that_names_it() {
        let (r, _w) = std::io::pipe().unwrap();
        let link = Link::new("the agent on bk@server", Some(Duration::from_secs(1)));
        let mut reader = link.reader(r).unwrap();
        let err = reader.read(&mut [0u8; 10]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(err.to_string(), "no data from the agent on bk@server for 1 s (io_timeout)");
    }

    #[test]
    fn a_peer_that_stops_reading_is_a_timeout() {
        let (_r, w) = std::io::pipe().unwrap();
        let link = Link::new("the agent", Some(Duration::from_secs(1)));
        let mut writer = link.writer(w).unwrap();
        let err = writer.write_all(&vec![0u8; 1 << 20]).unwrap_err();
        assert_eq!(err.to_string(), "the agent took no data for 1 s (io_timeout)");
    }

    /// Regression: a peer gone before our first write was reported as
    /// "writing to …: Broken pipe", where one gone before our read says the
    /// connection closed: the same event, now said alike.
    #[test]
    fn a_peer_gone_while_we_write_closed_the_connection() {
        let (r, w) = std::io::pipe().unwrap();
        drop(r);
        let link = Link::new("the agent", None);
        let mut writer = link.writer(w).unwrap();
        let err = writer.write_all(b"hello").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        assert!(err.to_string().starts_with("the agent closed the connection"), "{err}");
    }

    #[test]
    fn data_flows_and_close_ends_a_wait() {
        let (r, mut w) = std::io::pipe().unwrap();
        let link = Link::new("the agent", None);
        let mut reader = link.reader(r).unwrap();
        w.write_all(b"abc").unwrap();
        let mut buf = [0u8; 3];
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"abc");
        let closer = {
            let link = link.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                link.close();
            })
        };
        let err = reader.read(&mut buf).unwrap_err();
        closer.join().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }
}
