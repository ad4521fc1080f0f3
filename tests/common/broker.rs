//! A private RabbitMQ node for one test: its own node name, AMQP and
//! distribution ports, data, logs and Erlang cookie under a temp dir, so a test
//! may stop it, start it again or raise a memory/disk alarm without touching the
//! shared broker on 5672 that other tests use. Started with the distribution's
//! own scripts under `/usr/lib/rabbitmq/bin` (the `/usr/sbin` wrappers switch to
//! the `rabbitmq` user and drop the environment that makes the node private).
//! Dropping it stops the node and deletes its directory. The stream plugin is
//! on, listening on a free port of its own ([`PrivateBroker::stream_url`]),
//! and over TLS on another ([`PrivateBroker::stream_tls_url`]) with a
//! certificate for `localhost` from a CA made for this node.
//!
//! Also here: a consumer that survives the broker going away (it reconnects and
//! keeps everything it got), which a test of broker outages needs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::cluster::free_port;

const BIN: &str = "/usr/lib/rabbitmq/bin";

pub struct PrivateBroker {
    pub dir: PathBuf,
    pub port: u16,
    /// The `rabbitmq_stream` listener.
    pub stream_port: u16,
    /// Its TLS listener.
    pub stream_tls_port: u16,
    pub node: String,
    dist_port: u16,
}

/// Ports the node may use: not the shared node's (5672, 25672) and not the
/// ranges RabbitMQ's CLI tools pick their own distribution port from (dist port
/// + 10000..+10010, i.e. 35672..35682 for the shared node and ours).
fn usable(port: u16, others: &[u16]) -> bool {
    let clash = |p: u16, base: u16| p >= base && p <= base.saturating_add(10);
    port < 50000
        && !clash(port, 25672)
        && !clash(port, 35672)
        && others
            .iter()
            .all(|&o| o != port && !clash(port, o.saturating_add(10000)))
}

fn pick_port(others: &[u16]) -> u16 {
    loop {
        let p = free_port();
        if usable(p, others) {
            return p;
        }
    }
}

impl PrivateBroker {
    /// Whether this machine can run a private node (RabbitMQ installed).
    pub fn available() -> bool {
        Path::new(BIN).join("rabbitmq-server").exists()
    }

    /// Starts a node and waits until it accepts AMQP connections (guest/guest
    /// from localhost). Panics with the node's log if it does not come up.
    pub fn start() -> PrivateBroker {
        let name = super::unique_name("odoocdc").replace('_', "-");
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(dir.join("log")).unwrap();
        let port = pick_port(&[]);
        let dist_port = pick_port(&[port]);
        let stream_port = pick_port(&[port, dist_port]);
        let stream_tls_port = pick_port(&[port, dist_port, stream_port]);
        make_certificates(&dir);
        let tls = dir.join("tls");
        let tls = tls.display();
        std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_stream].\n").unwrap();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.1 = 127.0.0.1:{port}\n\
                 stream.listeners.tcp.1 = 127.0.0.1:{stream_port}\n\
                 stream.advertised_host = 127.0.0.1\n\
                 stream.advertised_port = {stream_port}\n\
                 stream.listeners.ssl.1 = 127.0.0.1:{stream_tls_port}\n\
                 stream.advertised_tls_port = {stream_tls_port}\n\
                 ssl_options.cacertfile = {tls}/ca.crt\n\
                 ssl_options.certfile = {tls}/server.crt\n\
                 ssl_options.keyfile = {tls}/server.key\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n\
                 disk_free_limit.absolute = 50MB\n\
                 vm_memory_high_watermark.relative = 0.4\n"
            ),
        )
        .unwrap();
        // An empty env file, so /etc/rabbitmq/rabbitmq-env.conf (the shared
        // node's name and ports) is not read.
        std::fs::write(dir.join("rabbitmq-env.conf"), "").unwrap();
        let broker = PrivateBroker {
            dir,
            port,
            stream_port,
            stream_tls_port,
            node: format!("{name}@localhost"),
            dist_port,
        };
        let out = broker
            .command("rabbitmq-server")
            .arg("-detached")
            .output()
            .expect("run rabbitmq-server");
        assert!(
            out.status.success(),
            "rabbitmq-server -detached: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        broker.await_running(Duration::from_secs(120));
        broker
    }

    fn command(&self, program: &str) -> Command {
        let d = &self.dir;
        let mut c = Command::new(Path::new(BIN).join(program));
        c.env("HOME", d) // the Erlang cookie of this node and its CLI calls
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .current_dir(d);
        c
    }

    /// `rabbitmqctl -n <node> args...` with a time limit.
    /// Messages in `queue` (ready and unacknowledged), as the broker counts
    /// them; `None` when it cannot tell (stopped, no such queue).
    pub fn queue_depth(&self, queue: &str) -> Option<u64> {
        let out = self.ctl(&["list_queues", "name", "messages", "--no-table-headers"]);
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(queue))
                .then(|| it.next().and_then(|n| n.parse().ok()))
                .flatten()
        })
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut c = self.command("rabbitmqctl");
        c.arg("-n").arg(&self.node).arg("-q").args(args);
        Command::new("timeout")
            .arg("60")
            .arg(c.get_program())
            .args(c.get_args())
            .envs(c.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
            .current_dir(&self.dir)
            .output()
            .expect("run rabbitmqctl")
    }

    fn ctl_ok(&self, args: &[&str]) {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} on {}: {}{}\n{}",
            self.node,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }

    fn await_running(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self
                .ctl(&["await_startup", "--timeout", "5"])
                .status
                .success()
                && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", self.stream_port)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", self.stream_tls_port)).is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "private RabbitMQ node {} did not start:\n{}",
                self.node,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `rabbitmq-stream://guest:guest@127.0.0.1:STREAM_PORT/%2f`.
    pub fn stream_url(&self) -> String {
        format!(
            "rabbitmq-stream://guest:guest@127.0.0.1:{}/%2f",
            self.stream_port
        )
    }

    /// `rabbitmq-stream+tls://guest:guest@localhost:TLS_PORT/%2f?cacertfile=...`,
    /// trusting this node's own CA.
    pub fn stream_tls_url(&self) -> String {
        format!(
            "rabbitmq-stream+tls://guest:guest@localhost:{}/%2f?cacertfile={}",
            self.stream_tls_port,
            self.ca_file().display()
        )
    }

    /// The CA that signed this node's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("tls").join("ca.crt")
    }

    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the RabbitMQ application (the Erlang VM stays up): every
    /// connection is closed and new ones are refused, as in a broker restart.
    pub fn stop_app(&self) {
        self.ctl_ok(&["stop_app"]);
    }

    /// Starts the application again, with the durable queues and their messages.
    pub fn start_app(&self) {
        self.ctl_ok(&["start_app"]);
        self.await_running(Duration::from_secs(120));
    }

    /// Raises (or clears) a memory alarm: publishing connections are blocked
    /// (`connection.blocked`) until it clears.
    pub fn memory_alarm(&self, on: bool) {
        self.ctl_ok(&["set_vm_memory_high_watermark", if on { "0" } else { "0.4" }]);
    }

    /// Raises (or clears) a disk alarm by demanding more free disk than there is.
    pub fn disk_alarm(&self, on: bool) {
        self.ctl_ok(&["set_disk_free_limit", if on { "100000GB" } else { "50MB" }]);
    }

    /// Names of the alarms in force (`status`), for assertions.
    pub fn alarms(&self) -> String {
        let out = self.ctl(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split("Alarms")
            .nth(1)
            .map(|s| s.split("\n\n").take(2).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("log").join(format!("{}.log", self.node)))
            .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// A CA and a server certificate for `localhost` and 127.0.0.1 under
/// `dir/tls`, made with the openssl CLI (`scripts/services.sh` installs it).
fn make_certificates(dir: &Path) {
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::write(
        tls.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: [Vec<&str>; 3] = [
        [
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "30",
                "-subj",
                "/CN=odoo-cdc private broker CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
            ],
        ]
        .concat(),
        [
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=localhost",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
            ],
        ]
        .concat(),
        vec![
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(&args)
            .current_dir(&tls)
            .output()
            .expect("run openssl (scripts/services.sh up installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop"]);
        // If the CLI could not reach it, end the VM by its pid (ours alone).
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let pid = pid.trim();
            if !pid.is_empty() && Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One delivery as a resilient consumer saw it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message_id: String,
    pub routing_key: String,
    pub redelivered: bool,
    pub body: Vec<u8>,
}

impl Delivery {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// A consumer of a durable queue that reconnects whenever the broker closes
/// its connection (outage, restart) and keeps every delivery it got, acking
/// each after storing it.
pub struct ResilientConsumer {
    got: Arc<Mutex<Vec<Delivery>>>,
    stop: Arc<AtomicBool>,
    pub reconnects: Arc<std::sync::atomic::AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl ResilientConsumer {
    /// Declares `exchange` (topic, durable) and a durable classic `queue`
    /// bound with `binding` on the broker at `url`, and consumes it.
    pub async fn start(url: &str, exchange: &str, queue: &str, binding: &str) -> Self {
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reconnects = Arc::new(std::sync::atomic::AtomicU32::new(0));
        // The first session declares everything before the connector starts.
        let (conn, consumer) = consume_once(url, exchange, queue, binding)
            .await
            .expect("consumer connects to the private broker");
        let task = {
            let (url, exchange, queue, binding) = (
                url.to_string(),
                exchange.to_string(),
                queue.to_string(),
                binding.to_string(),
            );
            let (got, stop, reconnects) = (got.clone(), stop.clone(), reconnects.clone());
            tokio::spawn(async move {
                let mut session = Some((conn, consumer));
                while !stop.load(Ordering::Relaxed) {
                    let (conn, consumer) = match session.take() {
                        Some(s) => s,
                        None => match consume_once(&url, &exchange, &queue, &binding).await {
                            Ok(s) => {
                                reconnects.fetch_add(1, Ordering::Relaxed);
                                s
                            }
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(300)).await;
                                continue;
                            }
                        },
                    };
                    drain(&conn, consumer, &got, &stop).await;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        conn.close(200, "consumer done".into()),
                    )
                    .await;
                }
            })
        };
        ResilientConsumer {
            got,
            stop,
            reconnects,
            task,
        }
    }

    pub fn snapshot(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }

    /// Everything received so far, which is forgotten here (a long test
    /// checks in rounds and keeps memory bounded).
    pub fn take(&self) -> Vec<Delivery> {
        std::mem::take(&mut *self.got.lock().unwrap())
    }

    pub fn len(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Distinct message ids received so far.
    pub fn unique(&self) -> usize {
        let got = self.got.lock().unwrap();
        let mut ids: Vec<&str> = got.iter().map(|d| d.message_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    pub async fn stop(self) -> Vec<Delivery> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        let got = self.got.lock().unwrap();
        got.clone()
    }
}

/// Deletes a queue a [`ResilientConsumer`] declared (they are durable).
pub async fn delete_queue(url: &str, queue: &str) {
    let Ok(Ok(conn)) = tokio::time::timeout(
        Duration::from_secs(10),
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()),
    )
    .await
    else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            ch.queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default()),
        )
        .await;
    }
    let _ = conn.close(200, "done".into()).await;
}

async fn consume_once(
    url: &str,
    exchange: &str,
    queue: &str,
    binding: &str,
) -> Result<(lapin::Connection, lapin::Consumer), String> {
    use lapin::options::*;
    use lapin::types::FieldTable;
    let step = Duration::from_secs(10);
    let conn = tokio::time::timeout(
        step,
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let setup = async {
        let ch = conn.create_channel().await?;
        ch.exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.basic_qos(1000, BasicQosOptions::default()).await?;
        ch.basic_consume(
            queue.into(),
            "faults".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
    };
    let consumer = tokio::time::timeout(step, setup)
        .await
        .map_err(|_| "consumer setup timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok((conn, consumer))
}

async fn drain(
    conn: &lapin::Connection,
    mut consumer: lapin::Consumer,
    got: &Mutex<Vec<Delivery>>,
    stop: &AtomicBool,
) {
    use futures::StreamExt;
    use lapin::options::BasicAckOptions;
    while !stop.load(Ordering::Relaxed) {
        let d = match tokio::time::timeout(Duration::from_millis(500), consumer.next()).await {
            // A broker that restarted its application may leave the
            // consumer's stream open but dead: reconnect when the connection
            // says so, instead of waiting for deliveries that never come.
            Err(_) if !conn.status().connected() => return,
            Err(_) => continue,
            Ok(None) | Ok(Some(Err(_))) => return,
            Ok(Some(Ok(d))) => d,
        };
        got.lock().unwrap().push(Delivery {
            message_id: d
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            routing_key: d.routing_key.to_string(),
            redelivered: d.redelivered,
            body: d.data.to_vec(),
        });
        if tokio::time::timeout(Duration::from_secs(5), d.ack(BasicAckOptions::default()))
            .await
            .map_or(true, |r| r.is_err())
        {
            return;
        }
    }
}
