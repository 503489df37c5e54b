//! `--prom-listen`: the metrics over HTTP, served by hyper on a one-thread
//! tokio runtime in its own thread (`prometheus`).
//!
//! - `GET --prom-path` (default `/metrics`): the Prometheus text format.
//! - `GET /healthz`: 200 or 503 as the program's [`HealthCheck`] says
//!   (the exporter: polls keep completing).
//! - `GET /`: a short index; anything else 404, methods other than GET and
//!   HEAD 405.
//!
//! The listener is bound when the exporter starts, so a taken port or an
//! address not on this host fails the start with one line. Connections are
//! capped; while every slot is taken, new ones wait in the kernel's listen
//! backlog rather than being closed. A connection must send its request
//! headers within a few seconds and lives at most [`CONNECTION_DEADLINE`],
//! keep-alive included, so idle or misbehaving clients can neither pile up
//! memory or threads nor keep a scraper out for long.

use std::convert::Infallible;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::runtime::Runtime;
use tokio::sync::{oneshot, Semaphore};

use crate::shutdown::{spawn, Shutdown};

/// Connections served at once; more wait to be accepted. A scraper needs
/// one.
const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of a connection, so clients that stay connected cannot hold
/// every slot: a waiting scrape gets one within this (Prometheus's default
/// scrape timeout is 10 s, and idle clients go after `HEADER_TIMEOUT`).
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. out of file descriptors) so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub struct PromServer {
    listener: TcpListener,
    runtime: Runtime,
    endpoint: Arc<Endpoint>,
}

/// The endpoint's running thread.
pub struct PromThread {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl PromThread {
    /// Stops serving and joins the thread.
    pub fn stop(self) {
        drop(self.stop);
        // A panic there has already aborted the program's shutdown handle.
        let _ = self.thread.join();
    }
}

/// `/healthz`: `Ok(line)` is 200, `Err(line)` 503.
pub type HealthCheck = Box<dyn Fn() -> Result<String, String> + Send + Sync>;

struct Endpoint {
    /// Which program, for the index page.
    program: &'static str,
    path: String,
    registry: Registry,
    health: HealthCheck,
}

impl PromServer {
    /// Binds `addr` and builds the runtime; serves nothing until [`serve`](Self::serve).
    pub fn bind(
        program: &'static str,
        addr: SocketAddr,
        path: String,
        registry: Registry,
        health: HealthCheck,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        Ok(PromServer {
            listener,
            runtime,
            endpoint: Arc::new(Endpoint {
                program,
                path,
                registry,
                health,
            }),
        })
    }

    /// The bound address (the real port when `--prom-listen` asked for 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// `--prom-path`.
    pub fn path(&self) -> &str {
        &self.endpoint.path
    }

    /// Serves on a thread named `prometheus` until [`PromThread::stop`]. A
    /// failure to serve aborts `shutdown`, with the reason.
    pub fn spawn(self, shutdown: &Shutdown) -> io::Result<PromThread> {
        let (stop, stopped) = oneshot::channel();
        let sd = shutdown.clone();
        let thread = spawn("prometheus".into(), shutdown, move || {
            if let Err(e) = self.serve(stopped) {
                sd.abort(format!("serving metrics: {e}"));
            }
        })?;
        Ok(PromThread { stop, thread })
    }

    /// Serves until `stop` is sent or dropped.
    fn serve(self, stop: oneshot::Receiver<()>) -> io::Result<()> {
        let PromServer {
            listener,
            runtime,
            endpoint,
        } = self;
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
            tokio::pin!(stop);
            loop {
                // A free slot first: until then, connections wait in the
                // listen backlog.
                let slot = tokio::select! {
                    slot = Arc::clone(&slots).acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => return Ok(()), // never closed
                    },
                    _ = &mut stop => return Ok(()),
                };
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => {
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                            continue;
                        }
                    },
                    _ = &mut stop => return Ok(()),
                };
                let endpoint = Arc::clone(&endpoint);
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let response = endpoint.respond(&req);
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let connection = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service);
                    // A client that goes away mid-request is its own
                    // problem; one that outstays the deadline is cut.
                    let _ = tokio::time::timeout(CONNECTION_DEADLINE, connection).await;
                    drop(slot);
                });
            }
        })
    }
}

impl Endpoint {
    fn respond<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match req.uri().path() {
            path if path == self.path => self.scrape(),
            "/healthz" => match (self.health)() {
                Ok(line) => text(StatusCode::OK, format!("{line}\n")),
                Err(line) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{line}\n")),
            },
            "/" => text(
                StatusCode::OK,
                format!(
                    "{}\nmetrics: {}\nhealth: /healthz\n",
                    self.program, self.path
                ),
            ),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    fn scrape(&self) -> Response<Full<Bytes>> {
        let encoder = TextEncoder::new();
        let mut body = Vec::with_capacity(16 * 1024);
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut body) {
            return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"));
        }
        let mut response = Response::new(Full::new(Bytes::from(body)));
        if let Ok(value) = HeaderValue::from_str(encoder.format_type()) {
            response.headers_mut().insert(CONTENT_TYPE, value);
        }
        response
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// Every slot held by a client that connects and sends nothing: a
    /// scrape waits for a slot instead of being turned away, and gets its
    /// metrics once the idle clients are cut.
    #[test]
    fn a_scrape_gets_through_idle_clients_holding_every_slot() {
        let shutdown = Shutdown::new();
        let server = PromServer::bind(
            "test",
            "127.0.0.1:0".parse().unwrap(),
            "/metrics".into(),
            Registry::new(),
            Box::new(|| Ok("ok".into())),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let thread = server.spawn(&shutdown).unwrap();
        let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let mut scrape = TcpStream::connect(addr).unwrap();
        scrape
            .set_read_timeout(Some(CONNECTION_DEADLINE + HEADER_TIMEOUT))
            .unwrap();
        scrape
            .write_all(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        scrape.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response:?}");
        assert!(response.ends_with("ok\n"), "{response:?}");
        drop(idle);
        thread.stop();
    }
}
