//! `drover-guest`: the in-guest CLI.
//!
//! Commands that talk to the host go through the agent's app socket (see [`crate::app`]), never
//! to the ports directly: the agent holds them. Every outcome maps to an exit code ([`exit`]) so
//! scripts can tell "the host said no" from "the agent is not there".

use std::io::{self, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use drover_proto::GuestOp;
use serde_json::{json, Value};

use crate::app::{read_line, write_line, Line};
use crate::cli::{GuestCommand, ListenArgs, RequestArgs};

/// Exit codes of `drover-guest`.
pub mod exit {
    /// Accepted (without `--wait`), or completed.
    pub const OK: u8 = 0;
    /// Usage error or bad input (including a request the protocol refuses).
    pub const USAGE: u8 = 1;
    /// The host refused the request; the reason is on stderr.
    pub const REFUSED: u8 = 2;
    /// The request completed with status `failed`; the error is on stderr.
    pub const FAILED: u8 = 3;
    /// The agent is not reachable, the host did not acknowledge, or waiting timed out.
    pub const UNAVAILABLE: u8 = 4;
    /// `scan`: the host changed between the scan's two reads of its id (`RC_INCONSISTENT_OUTPUT`);
    /// the inventory was discarded.
    pub const INCONSISTENT: u8 = 5;
}

/// How long to wait for the agent's answer to a request: its own ack bound plus a margin.
const ACK_WAIT: Duration = Duration::from_secs(15);
/// Longest line accepted from the agent (an event is at most about a frame).
const MAX_REPLY_LINE: usize = 4 * drover_proto::MAX_FRAME_LEN;
/// Pause between reconnection attempts of `listen`.
const RECONNECT: Duration = Duration::from_secs(1);

/// A failed command: its exit code and what to say on stderr.
#[derive(Debug)]
pub struct Failure {
    /// One of [`exit`].
    pub code: u8,
    /// One line for the user (empty: say nothing).
    pub message: String,
    /// Whether it failed by waiting too long.
    pub timed_out: bool,
}

pub(crate) fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
        timed_out: false,
    }
}

/// Run one `drover-guest` command; returns its exit code, having printed its output to stdout and
/// its errors to stderr.
pub fn run(command: &GuestCommand) -> u8 {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match execute(command, &mut out) {
        Ok(()) => exit::OK,
        Err(f) => {
            if !f.message.is_empty() {
                let _ = writeln!(io::stderr().lock(), "drover-guest: {}", f.message);
            }
            f.code
        }
    }
}

/// How to print the outcome of a waited-for request.
#[derive(Clone, Copy)]
enum Output {
    /// The whole event, one JSON line.
    Event,
    /// The event's `result`, pretty.
    Result,
}

/// Run `command`, printing its output to `out`.
pub fn execute(command: &GuestCommand, out: &mut dyn Write) -> Result<(), Failure> {
    match command {
        GuestCommand::Status => {
            let info = serde_json::to_value(crate::info::agent_info())
                .map_err(|e| fail(exit::USAGE, format!("encoding agent info: {e}")))?;
            print_line(out, &info)
        }
        GuestCommand::Reconfigure(a) => request(
            out,
            &a.request,
            GuestOp::Reconfigure {
                changes: a.changes(),
            },
            a.wait.then_some(Output::Event),
        ),
        GuestCommand::Save(a) => request(
            out,
            &a.request,
            GuestOp::Save {
                name: a.name.clone(),
            },
            a.wait.then_some(Output::Event),
        ),
        GuestCommand::Restore(a) => request(
            out,
            &a.request,
            GuestOp::Restore {
                state: a.state.clone(),
            },
            a.wait.then_some(Output::Event),
        ),
        GuestCommand::List(a) => request(out, &a.request, GuestOp::List, Some(Output::Result)),
        GuestCommand::HostInfo(a) => {
            request(out, &a.request, GuestOp::HostInfo, Some(Output::Result))
        }
        GuestCommand::Listen(a) => listen(out, a),
        GuestCommand::HostId(a) => {
            let answer = crate::scan::host_identity(&a.socket, Duration::from_secs(a.timeout))?;
            let v = serde_json::to_value(answer)
                .map_err(|e| fail(exit::USAGE, format!("encoding the answer: {e}")))?;
            print_pretty(out, &v)
        }
        GuestCommand::Scan(a) => crate::scan::scan(out, a),
    }
}

/// Send `op` as the agent's own kind of request (no principal: only ops that need no grant) and,
/// with `wait`, return the outcome event (a `failed` one as [`exit::FAILED`]); without, the ack.
pub(crate) fn ask(socket: &Path, op: &GuestOp, wait: Option<Duration>) -> Result<Value, Failure> {
    let line = json!({
        "cmd": "request",
        "principal": "",
        "secret": "",
        "op": op,
        "wait": wait.is_some(),
    });
    let mut conn = Conn::connect(socket)?;
    conn.send(&line)?;
    let reply = conn.recv(Some(Instant::now() + ACK_WAIT), "the agent's answer")?;
    let ack = agent_reply(&reply, "ack")?;
    if ack["accepted"] != Value::Bool(true) {
        let reason = ack["reason"].as_str().unwrap_or("no reason given");
        return Err(fail(
            exit::REFUSED,
            format!("refused by the host: {reason}"),
        ));
    }
    let Some(wait) = wait else {
        return Ok(ack.clone());
    };
    let reply = conn.recv(Some(Instant::now() + wait), "the outcome")?;
    let event = agent_reply(&reply, "event")?;
    if event["status"] == "failed" {
        let error = event["error"].as_str().unwrap_or("no error given");
        return Err(fail(
            exit::FAILED,
            format!("{} failed: {error}", op_name(event)),
        ));
    }
    Ok(event.clone())
}

/// Send one request; print the ticket, or (when `wait` says how) the outcome.
fn request(
    out: &mut dyn Write,
    args: &RequestArgs,
    op: GuestOp,
    wait: Option<Output>,
) -> Result<(), Failure> {
    let creds = crate::cli::credentials(args, |k| std::env::var(k).ok())
        .map_err(|m| fail(exit::USAGE, m))?;
    let line = json!({
        "cmd": "request",
        "principal": creds.principal,
        "secret": creds.secret,
        "app_id": args.app_id,
        "op": op,
        "data": args.data,
        "wait": wait.is_some(),
    });
    let mut conn = Conn::connect(&args.socket)?;
    conn.send(&line)?;
    let reply = conn.recv(Some(Instant::now() + ACK_WAIT), "the agent's answer")?;
    let ack = agent_reply(&reply, "ack")?;
    if ack["accepted"] != Value::Bool(true) {
        let reason = ack["reason"].as_str().unwrap_or("no reason given");
        return Err(fail(
            exit::REFUSED,
            format!("refused by the host: {reason}"),
        ));
    }
    let ticket = ack["ticket"].as_str().unwrap_or_default().to_string();
    let Some(output) = wait else {
        return print_line(out, &json!({ "ticket": ticket }));
    };

    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let reply = conn.recv(Some(deadline), "the outcome").map_err(|f| {
        if f.timed_out {
            fail(
                exit::UNAVAILABLE,
                format!(
                    "no outcome for ticket {ticket} within {} s; the request may still complete \
                     (use --app-id and `drover-guest listen` to hear of it)",
                    args.timeout
                ),
            )
        } else {
            f
        }
    })?;
    let event = agent_reply(&reply, "event")?;
    match output {
        Output::Event => print_line(out, event)?,
        Output::Result if event["status"] != "failed" => print_pretty(out, &event["result"])?,
        Output::Result => {}
    }
    if event["status"] == "failed" {
        let error = event["error"].as_str().unwrap_or("no error given");
        return Err(fail(
            exit::FAILED,
            format!("{} failed: {error}", op_name(event)),
        ));
    }
    Ok(())
}

fn op_name(event: &Value) -> &str {
    event["op"].as_str().unwrap_or("request")
}

/// `reply[key]`, or the failure the agent reported instead.
fn agent_reply<'a>(reply: &'a Value, key: &str) -> Result<&'a Value, Failure> {
    if let Some(v) = reply.get(key) {
        return Ok(v);
    }
    if let Some(message) = reply["error"].as_str() {
        // The request itself was wrong: the user can fix it. Anything else is the agent or host
        // being unavailable.
        let code = match reply["code"].as_str() {
            Some("invalid" | "bad_line" | "too_long") => exit::USAGE,
            _ => exit::UNAVAILABLE,
        };
        return Err(fail(code, message));
    }
    Err(fail(
        exit::UNAVAILABLE,
        format!("unexpected answer from the agent: {reply}"),
    ))
}

/// Print every event for the app id, forever; reconnect when the agent restarts.
fn listen(out: &mut dyn Write, args: &ListenArgs) -> Result<(), Failure> {
    let line = json!({ "cmd": "listen", "app_id": args.app_id });
    let mut ever_connected = false;
    loop {
        let attempt = Conn::connect(&args.socket).and_then(|mut conn| {
            conn.send(&line)?;
            let reply = conn.recv(Some(Instant::now() + ACK_WAIT), "the agent's answer")?;
            agent_reply(&reply, "listening")?;
            Ok(conn)
        });
        let mut conn = match attempt {
            Ok(c) => c,
            // Before the first success, tell the user at once (wrong socket, bad app id).
            Err(f) if !ever_connected => return Err(f),
            Err(_) => {
                thread::sleep(RECONNECT);
                continue;
            }
        };
        if ever_connected {
            let _ = writeln!(io::stderr().lock(), "drover-guest: listening again");
        }
        ever_connected = true;
        loop {
            let event = match conn.recv(None, "the next event") {
                Ok(reply) => reply,
                Err(f) => {
                    let _ = writeln!(
                        io::stderr().lock(),
                        "drover-guest: {}; reconnecting (events meanwhile are lost)",
                        f.message
                    );
                    break;
                }
            };
            if let Some(ev) = event.get("event") {
                print_line(out, ev)?;
            }
        }
        thread::sleep(RECONNECT);
    }
}

/// One connection to the agent's app socket.
struct Conn {
    sock: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Conn {
    fn connect(path: &Path) -> Result<Conn, Failure> {
        let unreachable = |e: io::Error| {
            fail(
                exit::UNAVAILABLE,
                format!(
                    "cannot reach the agent at {}: {e} (is drover-agent running?)",
                    path.display()
                ),
            )
        };
        let sock = UnixStream::connect(path).map_err(unreachable)?;
        let reader = BufReader::new(sock.try_clone().map_err(unreachable)?);
        let _ = sock.set_write_timeout(Some(ACK_WAIT));
        Ok(Conn { sock, reader })
    }

    fn send(&mut self, line: &Value) -> Result<(), Failure> {
        write_line(&mut self.sock, line)
            .map_err(|e| fail(exit::UNAVAILABLE, format!("writing to the agent: {e}")))
    }

    /// The next line from the agent, waiting until `deadline` (forever if `None`).
    fn recv(&mut self, deadline: Option<Instant>, what: &str) -> Result<Value, Failure> {
        let timeout = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // A zero timeout means "none" to the socket: wait at least a moment.
                Some(left.max(Duration::from_millis(1)))
            }
            None => None,
        };
        let _ = self.sock.set_read_timeout(timeout);
        match read_line(&mut self.reader, MAX_REPLY_LINE) {
            Ok(Line::Line(l)) => serde_json::from_slice(&l).map_err(|e| {
                fail(
                    exit::UNAVAILABLE,
                    format!("unreadable answer from the agent: {e}"),
                )
            }),
            Ok(Line::Eof) => Err(fail(
                exit::UNAVAILABLE,
                format!("the agent closed the connection before {what}"),
            )),
            Ok(Line::TooLong) => Err(fail(exit::UNAVAILABLE, "the agent sent an over-long line")),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(Failure {
                    timed_out: true,
                    ..fail(exit::UNAVAILABLE, format!("timed out waiting for {what}"))
                })
            }
            Err(e) => Err(fail(
                exit::UNAVAILABLE,
                format!("reading from the agent: {e}"),
            )),
        }
    }
}

pub(crate) fn print_line(out: &mut dyn Write, v: &Value) -> Result<(), Failure> {
    writeln!(out, "{v}")
        .and_then(|()| out.flush())
        .map_err(stdout_failure)
}

pub(crate) fn print_pretty(out: &mut dyn Write, v: &Value) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(stdout_failure)
}

fn stdout_failure(e: io::Error) -> Failure {
    // A closed pipe (`| head`) is the reader saying it has enough: not an error.
    if e.kind() == io::ErrorKind::BrokenPipe {
        fail(exit::OK, "")
    } else {
        fail(exit::USAGE, format!("writing to stdout: {e}"))
    }
}
