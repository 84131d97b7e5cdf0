//! The `grid` binary against a scripted HTTP server on a real socket: requests sent (method, path,
//! bearer token, JSON body), tables and `--json` printed, errors reported, and `job run` following
//! a Server-Sent Events stream written in awkward pieces, ending with the job's exit code.

use std::collections::HashMap;
use std::process::Output;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    auth: Option<String>,
    body: String,
}

/// What the server answers to `METHOD path`: a list of raw byte pieces written one by one, the
/// connection closed after the last.
type Script = HashMap<String, Vec<Vec<u8>>>;

struct Server {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn json_answer(status: &str, body: &str) -> Vec<Vec<u8>> {
    vec![
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    ]
}

async fn read_request(sock: &mut TcpStream) -> Option<Seen> {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let mut len = 0;
    let mut auth = None;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().ok()?,
                "authorization" => auth = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Seen {
        method,
        path,
        auth,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

async fn serve(script: Script) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let script = Arc::new(script);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            let script = script.clone();
            tokio::spawn(async move {
                let Some(req) = read_request(&mut sock).await else {
                    return;
                };
                let key = format!("{} {}", req.method, req.path);
                log.lock().expect("log lock").push(req);
                let pieces = script.get(&key).cloned().unwrap_or_else(|| {
                    json_answer("404 Not Found", r#"{"error":"no such route in the test"}"#)
                });
                for piece in pieces {
                    if sock.write_all(&piece).await.is_err() {
                        return;
                    }
                    let _ = sock.flush().await;
                }
                let _ = sock.shutdown().await;
            });
        }
    });
    Server { url, seen, task }
}

async fn grid(server: &Server, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_grid"))
        .args(["--url", &server.url, "--token", "t0k"])
        .args(args)
        .env_remove("GRID_URL")
        .env_remove("GRID_TOKEN")
        .kill_on_drop(true)
        .output()
        .await
        .expect("run grid")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn nodes_table_json_and_errors() {
    let mut script = Script::new();
    script.insert(
        "GET /nodes".into(),
        json_answer(
            "200 OK",
            r#"[{"hostname":"h1","id":"525400123456","status":"running"}]"#,
        ),
    );
    script.insert(
        "GET /nodes/zz/mem".into(),
        json_answer("404 Not Found", r#"{"error":"node zz not found"}"#),
    );
    let server = serve(script).await;

    let out = grid(&server, &["nodes"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "ID            HOSTNAME  STATUS\n525400123456  h1        running\n"
    );

    let out = grid(&server, &["--json", "nodes"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v[0]["id"], "525400123456");
    assert!(
        text(&out.stdout).contains("\n  {"),
        "pretty: {}",
        text(&out.stdout)
    );

    let out = grid(&server, &["node", "zz", "mem"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "error: node zz not found (HTTP 404)\n");

    let seen = server.seen.lock().expect("lock").clone();
    assert!(
        seen.iter().all(|s| s.auth.as_deref() == Some("Bearer t0k")),
        "{seen:?}"
    );
}

#[tokio::test]
async fn job_run_streams_output_and_exits_with_the_code() {
    let stream_head =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
    let events = "event: stdout\ndata: line one\n\n\
                  : comment\n\
                  event: stderr\r\ndata: warn ✓\r\n\r\n\
                  event: stdout\ndata: \n\n\
                  event: stdout\ndata: line three\n\n\
                  event: exit\ndata: {\"state\": \"error\", \"code\": 7}\n\n";
    // Pieces cut in the middle of fields, of a UTF-8 character and of a `\r\n`.
    let bytes = events.as_bytes();
    let cuts = [5, 17, 40, 41, 49, 50, 62, 63, 90, bytes.len()];
    let mut pieces = vec![stream_head.to_vec()];
    let mut start = 0;
    for cut in cuts {
        pieces.push(bytes[start..cut].to_vec());
        start = cut;
    }
    let mut script = Script::new();
    script.insert(
        "POST /nodes/n1/processes".into(),
        vec![b"HTTP/1.1 202 Accepted\r\nlocation: /nodes/n1/jobs/job-42\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec()],
    );
    script.insert("GET /nodes/n1/jobs/job-42/stream".into(), pieces);
    let server = serve(script).await;

    let out = grid(
        &server,
        &[
            "job",
            "run",
            "n1",
            "--max-time",
            "9",
            "--env",
            "A=1",
            "--dir",
            "/srv",
            "--",
            "sh",
            "-c",
            "echo hi",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "line one\n\nline three\n");
    assert_eq!(text(&out.stderr), "warn ✓\n");

    let seen = server.seen.lock().expect("lock").clone();
    let post = seen.iter().find(|s| s.method == "POST").expect("a POST");
    let body: serde_json::Value = serde_json::from_str(&post.body).expect("json body");
    assert_eq!(body["name"], "sh");
    assert_eq!(body["args"], serde_json::json!(["-c", "echo hi"]));
    assert_eq!(body["pwd"], "/srv");
    assert_eq!(body["environment"], serde_json::json!(["A=1"]));
    assert_eq!(body["maxTime"], 9);
}

#[tokio::test]
async fn job_run_maps_timeout_and_falls_back_to_the_result() {
    let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
    let mut script = Script::new();
    script.insert(
        "POST /nodes/n1/processes".into(),
        json_answer("202 Accepted", r#"{"id":"j-body"}"#),
    );
    script.insert(
        "GET /nodes/n1/jobs/j-body/stream".into(),
        vec![
            head.to_vec(),
            b"event: exit\ndata: {\"state\":\"timeout\",\"code\":null}\n\n".to_vec(),
        ],
    );
    let server = serve(script).await;
    let out = grid(&server, &["job", "run", "n1", "sleep", "100"]).await;
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));

    // A stream that ends without `exit`: the job's result decides.
    let mut script = Script::new();
    script.insert(
        "POST /nodes/n1/processes".into(),
        vec![
            b"HTTP/1.1 202 Accepted\r\nlocation: /nodes/n1/jobs/j2\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                .to_vec(),
        ],
    );
    script.insert(
        "GET /nodes/n1/jobs/j2/stream".into(),
        vec![head.to_vec(), b"event: stdout\ndata: x\n\n".to_vec()],
    );
    script.insert(
        "GET /nodes/n1/jobs/j2".into(),
        json_answer(
            "200 OK",
            r#"{"id":"j2","name":"core.system","level":0,"startTime":0,"stdout":"x\n","stderr":"","state":"killed","data":"","code":null}"#,
        ),
    );
    let server = serve(script).await;
    let out = grid(&server, &["job", "run", "n1", "--", "true"]).await;
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "x\n");
}
