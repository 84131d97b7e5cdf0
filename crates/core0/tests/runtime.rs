//! The container runtime for real, as root: namespaces, overlay root, cgroup v1 limits, corex as
//! PID 1 and its exec protocol, checked from the host (`/proc`, cgroup files, mountinfo) and from
//! inside (jobs run through corex).
//!
//! Everything a test makes carries the run's name `gridrt-<test pid>`: the cgroup parent in every
//! hierarchy and the temporary directories. Guards stop the containers and remove their cgroups and
//! directories even when a test fails; the first test of a run removes what an earlier run whose
//! process is gone left behind.

use core0::containers::cgroups::{self, Layout, Limits};
use core0::containers::corex::{Client, wire};
use core0::containers::runtime::{self, ContainerSpec, Running, Runtime};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

const PREFIX: &str = "gridrt-";

fn run_name() -> String {
    format!("{PREFIX}{}", std::process::id())
}

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        remove_leftovers();
        Runtime::with_exe(Path::new(env!("CARGO_BIN_EXE_core0"))).expect("runtime")
    })
}

fn layout() -> Layout {
    Layout::detect(Path::new(cgroups::CGROUP_ROOT)).expect("cgroup layout")
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes the cgroups (killing what runs in them) and temp dirs of earlier runs that are gone.
fn remove_leftovers() {
    let dead = |name: &str| {
        name.strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
            .is_some_and(|p| !pid_alive(p))
    };
    let layout = layout();
    let roots: Vec<PathBuf> = match &layout {
        Layout::V1(m) => m.iter().map(|(_, d)| d.clone()).collect(),
        Layout::V2(r) => vec![r.clone()],
    };
    for root in roots {
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                eprintln!("removing leftover cgroup {}", e.path().display());
                let _ = cgroups::remove_parent(&layout, &name, Duration::from_secs(5));
            }
        }
    }
    for e in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if dead(&name) && !runtime::host_mounts().iter().any(|m| m.starts_with(&path)) {
            eprintln!("removing leftover dir {}", path.display());
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Tests alive in this run; the last one to finish removes the run's cgroup parent.
static ACTIVE: Mutex<usize> = Mutex::new(0);

/// A test's temp dir with a busybox root file system; removes the run's cgroup parent when the
/// last test of the run ends.
struct Fixture {
    tmp: tempfile::TempDir,
    lower: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let _ = runtime();
        *ACTIVE.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{}-", run_name()))
            .tempdir()
            .expect("tempdir");
        let lower = tmp.path().join("rootfs");
        for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root"] {
            std::fs::create_dir_all(lower.join(d)).expect("mkdir rootfs");
        }
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "needs a static /bin/busybox (apt-get install busybox-static)"
        );
        std::fs::copy(busybox, lower.join("bin/busybox")).expect("copy busybox");
        let list = std::process::Command::new(busybox)
            .arg("--list")
            .output()
            .expect("busybox --list");
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" && !applet.is_empty() {
                std::os::unix::fs::symlink("busybox", lower.join("bin").join(applet))
                    .expect("applet link");
            }
        }
        std::fs::write(lower.join("etc/image-file"), "from the image\n").expect("write");
        Self { tmp, lower }
    }

    fn spec(&self, limits: Limits) -> ContainerSpec {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let id = NEXT.fetch_add(1, Ordering::SeqCst);
        ContainerSpec {
            id,
            name: format!("test{id}"),
            rootfs_lower: self.lower.clone(),
            dir: self.tmp.path().join(format!("c{id}")),
            hostname: format!("box-{id}"),
            host_network: false,
            privileged: false,
            limits,
            cgroup_parent: run_name(),
            env: vec![("GRID_TEST".into(), "yes".into())],
            mounts: vec![],
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let mut n = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        if *n == 0 {
            let _ = cgroups::remove_parent(&layout(), &run_name(), Duration::from_secs(5));
        }
    }
}

/// A started container; stopped (cgroups, socket removed) and its directory removed on drop.
struct Ctr {
    running: Option<Running>,
    spec: ContainerSpec,
}

impl Ctr {
    fn start(spec: ContainerSpec) -> Self {
        let running = runtime().start(&spec).expect("start container");
        Self {
            running: Some(running),
            spec,
        }
    }

    fn r(&self) -> &Running {
        self.running.as_ref().expect("container is running")
    }

    fn stop(&mut self) -> Running {
        let r = self.running.take().expect("container is running");
        runtime()
            .stop(&r, Duration::from_secs(5))
            .expect("stop container");
        r
    }
}

impl Drop for Ctr {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = runtime().stop(&r, Duration::from_secs(2));
        }
        let _ = runtime::destroy(&self.spec.dir);
    }
}

#[derive(Debug, Default)]
struct JobOut {
    out: Vec<String>,
    err: Vec<String>,
    code: Option<i32>,
    signal: Option<i32>,
    error: Option<String>,
}

fn job_id() -> String {
    static N: AtomicU64 = AtomicU64::new(1);
    format!("job-{}", N.fetch_add(1, Ordering::SeqCst))
}

fn exec_req(id: &str, script: &str) -> wire::Request {
    wire::Request::Exec(wire::Exec {
        id: id.to_string(),
        name: "sh".into(),
        args: vec!["-c".into(), script.into()],
        env: BTreeMap::new(),
        dir: None,
        stdin: None,
    })
}

fn wait_job(c: &mut Client, id: &str) -> JobOut {
    let mut r = JobOut::default();
    loop {
        match c.recv(Duration::from_secs(60)).expect("event from corex") {
            wire::Event::Line { id: i, level, text } if i == id => {
                if level == wire::LEVEL_STDOUT {
                    r.out.push(text)
                } else {
                    r.err.push(text)
                }
            }
            wire::Event::Exit {
                id: i,
                code,
                signal,
                error,
            } if i == id => {
                r.code = code;
                r.signal = signal;
                r.error = error;
                return r;
            }
            wire::Event::Error { message, .. } => panic!("corex refused: {message}"),
            _ => {}
        }
    }
}

/// Runs `sh -c script` in the container and waits for it.
fn sh(ctr: &Ctr, script: &str) -> JobOut {
    let mut c = Client::connect(&ctr.r().socket()).expect("connect corex");
    let id = job_id();
    c.send(&exec_req(&id, script)).expect("send exec");
    wait_job(&mut c, &id)
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).expect("read ns link")
}

fn read(p: impl AsRef<Path>) -> String {
    std::fs::read_to_string(p.as_ref())
        .unwrap_or_else(|e| panic!("read {}: {e}", p.as_ref().display()))
}

#[test]
fn container_namespaces_overlay_cgroups_and_exec() {
    let fx = Fixture::new();
    let limits = Limits {
        cpu: Some(0.5),
        memory: Some(64 << 20),
        pids: Some(64),
    };
    let mut ctr = Ctr::start(fx.spec(limits));
    let pid = ctr.r().pid;
    let id = ctr.spec.id;

    // Namespaces, seen from the host.
    for kind in ["pid", "mnt", "uts", "ipc", "net"] {
        assert_ne!(ns("self", kind), ns(&pid.to_string(), kind), "{kind} ns");
    }
    // corex runs from the sealed copy: the binary's segments without its debug sections.
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe link");
    assert!(
        exe.to_string_lossy().contains("memfd:corex"),
        "{}",
        exe.display()
    );
    let copy = std::fs::metadata(format!("/proc/{pid}/exe"))
        .expect("stat copy")
        .len();
    let full = std::fs::metadata(env!("CARGO_BIN_EXE_core0"))
        .expect("stat")
        .len();
    assert!(copy > 0 && copy < full, "copy {copy} bytes, binary {full}");
    // Cgroups: corex is in c<id> of every controller, with the limits.
    let rel = format!("/{}/c{id}", run_name());
    let cg = read(format!("/proc/{pid}/cgroup"));
    let Layout::V1(mounts) = layout() else {
        panic!("this machine kind has cgroup v1")
    };
    for (controller, mount) in &mounts {
        let line = cg
            .lines()
            .find(|l| {
                l.split(':')
                    .nth(1)
                    .is_some_and(|c| c.split(',').any(|x| x == controller))
            })
            .unwrap_or_else(|| panic!("no {controller} line in {cg}"));
        assert!(line.ends_with(&rel), "{controller}: {line}");
        let procs = read(mount.join(rel.trim_start_matches('/')).join("cgroup.procs"));
        assert!(
            procs.split_whitespace().any(|p| p == pid.to_string()),
            "{controller} procs {procs}"
        );
    }
    let dir = |c: &str| {
        mounts
            .iter()
            .find(|(n, _)| n == c)
            .map(|(_, m)| m.join(rel.trim_start_matches('/')))
            .expect("controller mounted")
    };
    assert_eq!(
        read(dir("memory").join("memory.limit_in_bytes")).trim(),
        "67108864"
    );
    assert_eq!(read(dir("pids").join("pids.max")).trim(), "64");
    assert_eq!(read(dir("cpu").join("cpu.cfs_quota_us")).trim(), "50000");
    let devices = read(dir("devices").join("devices.list"));
    assert!(
        devices.contains("c 1:3 rwm") && !devices.contains("a *:* rwm"),
        "{devices}"
    );
    assert!(!read(dir("cpuset").join("cpuset.cpus")).trim().is_empty());

    // Hostname, from the host through the container's root and from inside.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    assert_eq!(read(root.join("etc/hostname")).trim(), ctr.spec.hostname);
    assert!(read(root.join("etc/hosts")).contains(&ctr.spec.hostname));
    let r = sh(&ctr, "hostname; echo $GRID_TEST");
    assert_eq!(r.out, [ctr.spec.hostname.clone(), "yes".to_string()]);
    assert_eq!(r.code, Some(0));

    // PID namespace, corex as PID 1, the host's directories and the socket invisible inside.
    let sock = ctr.r().socket();
    let script = format!(
        "echo $$; tr '\\0' ' ' < /proc/1/cmdline; echo; ls /; test -e {} && echo SOCKET-VISIBLE; \
         test -e /work && echo HOST-ROOT-VISIBLE; true",
        sock.display()
    );
    let r = sh(&ctr, &script);
    let inner: i32 = r.out[0].parse().expect("a pid");
    assert!(inner > 1 && inner < 100, "pid inside: {inner}");
    assert!(r.out[1].starts_with("corex __corex-init"), "{:?}", r.out);
    assert!(r.out.iter().any(|l| l == "bin") && r.out.iter().any(|l| l == "proc"));
    assert!(!r.out.iter().any(|l| l.contains("VISIBLE")), "{:?}", r.out);

    // Capabilities and no_new_privs of a job; lo up in its own net ns.
    let r = sh(
        &ctr,
        "grep -E 'CapBnd|CapEff|NoNewPrivs' /proc/self/status; ip addr show lo",
    );
    let field = |name: &str| {
        r.out
            .iter()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in {:?}", r.out))
    };
    let want = format!("{:016x}", core0::containers::corex::default_cap_mask());
    assert_eq!(field("CapBnd:"), want);
    assert_eq!(field("CapEff:"), want);
    assert_eq!(field("NoNewPrivs:"), "1");
    assert!(r.out.iter().any(|l| l.contains("127.0.0.1")), "{:?}", r.out);
    assert!(
        r.out.iter().any(|l| l.contains("LOOPBACK,UP")),
        "{:?}",
        r.out
    );
    // A read-only /sys, a minimal /dev and no way to mount.
    let r = sh(
        &ctr,
        "touch /sys/x 2>/dev/null || echo SYS-RO; ls /dev | tr '\\n' ' '; echo; \
         mount -t tmpfs t /mnt 2>/dev/null || echo NO-MOUNT",
    );
    assert!(r.out.contains(&"SYS-RO".to_string()), "{:?}", r.out);
    assert!(r.out.contains(&"NO-MOUNT".to_string()), "{:?}", r.out);
    for d in ["null", "zero", "urandom", "pts", "ptmx", "shm", "tty"] {
        assert!(
            r.out[1].split(' ').any(|x| x == d),
            "/dev lacks {d}: {}",
            r.out[1]
        );
    }

    // Overlay: a write lands in upper/, never in the image.
    let r = sh(
        &ctr,
        "echo kept > /data.txt; cat /etc/image-file; echo err >&2; exit 3",
    );
    assert_eq!(r.code, Some(3));
    assert_eq!(r.out, ["from the image"]);
    assert_eq!(r.err, ["err"]);
    assert_eq!(read(ctr.spec.dir.join("upper/data.txt")), "kept\n");
    assert!(!fx.lower.join("data.txt").exists());

    // A signal from inside does not stop PID 1.
    let r = sh(&ctr, "kill -TERM 1; kill -KILL 1; echo still");
    assert_eq!(r.out, ["still"]);
    let mut c = Client::connect(&sock).expect("connect");
    assert_eq!(
        c.ping(Duration::from_secs(5)).expect("pong"),
        (1, ctr.spec.hostname.clone())
    );

    // Adoption check.
    assert_eq!(runtime::find_running(&ctr.spec.dir), Some(pid));
    let adopted = runtime().adopt(&ctr.spec.dir).expect("adopt");
    assert_eq!(adopted.cgroups, ctr.r().cgroups);

    // Stop: no process, no cgroup, no mount left; the upper layer stays.
    let merged = ctr.spec.dir.join("merged");
    let stopped = ctr.stop();
    assert!(!pid_alive(pid) || read(format!("/proc/{pid}/stat")).contains(") Z"));
    assert!(!stopped.cgroups.exists(), "cgroups left");
    assert!(
        !runtime::host_mounts()
            .iter()
            .any(|m| m.starts_with(&ctr.spec.dir))
    );
    assert!(!ctr.spec.dir.join("corex.sock").exists());
    assert_eq!(runtime::find_running(&ctr.spec.dir), None);
    assert!(ctr.spec.dir.join("upper/data.txt").exists());
    assert!(
        merged.read_dir().expect("merged").next().is_none(),
        "merged not empty on host"
    );

    // Start again on the same directory: the file is still there.
    ctr.running = Some(runtime().start(&ctr.spec).expect("restart"));
    assert!(matches!(
        runtime().start(&ctr.spec),
        Err(runtime::RuntimeError::AlreadyRunning { .. })
    ));
    let r = sh(&ctr, "cat /data.txt");
    assert_eq!(r.out, ["kept"]);
    ctr.stop();
    runtime::destroy(&ctr.spec.dir).expect("destroy");
    assert!(!ctr.spec.dir.exists());
}

#[test]
fn exec_protocol_kill_stdin_errors() {
    let fx = Fixture::new();
    let ctr = Ctr::start(fx.spec(Limits::default()));
    let mut c = Client::connect(&ctr.r().socket()).expect("connect");

    // kill op: a running job ends by the signal.
    let id = job_id();
    c.send(&exec_req(&id, "echo started; exec sleep 100"))
        .expect("send");
    match c.recv(Duration::from_secs(10)).expect("line") {
        wire::Event::Line { text, .. } => assert_eq!(text, "started"),
        other => panic!("unexpected {other:?}"),
    }
    c.send(&wire::Request::Kill {
        id: id.clone(),
        signal: libc::SIGKILL,
    })
    .expect("send kill");
    let r = wait_job(&mut c, &id);
    assert_eq!((r.code, r.signal), (None, Some(libc::SIGKILL)));

    // Duplicate ids are refused while the first runs.
    let id = job_id();
    c.send(&exec_req(&id, "sleep 1")).expect("send");
    c.send(&exec_req(&id, "true")).expect("send");
    match c.recv(Duration::from_secs(10)).expect("error") {
        wire::Event::Error { id: Some(i), .. } => assert_eq!(i, id),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(wait_job(&mut c, &id).code, Some(0));

    // stdin, env, dir.
    let id = job_id();
    c.send(&wire::Request::Exec(wire::Exec {
        id: id.clone(),
        name: "sh".into(),
        args: vec!["-c".into(), "pwd; echo $FOO; cat".into()],
        env: [("FOO".to_string(), "bar".to_string())].into(),
        dir: Some("/tmp".into()),
        stdin: Some("line one\nline two".into()),
    }))
    .expect("send");
    let r = wait_job(&mut c, &id);
    assert_eq!(r.out, ["/tmp", "bar", "line one", "line two"]);

    // A program that does not exist ends with an error, not a hang.
    let id = job_id();
    c.send(&wire::Request::Exec(wire::Exec {
        id: id.clone(),
        name: "/no/such/program".into(),
        ..Default::default()
    }))
    .expect("send");
    let r = wait_job(&mut c, &id);
    assert!(r.error.is_some_and(|e| e.contains("/no/such/program")));

    // Garbage is answered with an error and the connection stays usable.
    c.send(&wire::Request::Kill {
        id: "nope".into(),
        signal: 9,
    })
    .expect("send");
    assert!(matches!(
        c.recv(Duration::from_secs(5)).expect("error"),
        wire::Event::Error { .. }
    ));
    assert_eq!(c.ping(Duration::from_secs(5)).expect("pong").0, 1);

    // Events of a job whose client went away wait for the next attached client.
    let id = job_id();
    {
        let mut c2 = Client::connect(&ctr.r().socket()).expect("connect");
        c2.send(&exec_req(&id, "sleep 0.3; echo later"))
            .expect("send");
    }
    drop(c);
    std::thread::sleep(Duration::from_millis(800));
    let mut c3 = Client::connect(&ctr.r().socket()).expect("connect");
    c3.send(&wire::Request::Attach).expect("attach");
    let r = wait_job(&mut c3, &id);
    assert_eq!(r.out, ["later"]);
}

#[test]
fn pids_limit_stops_fork_bombs() {
    let fx = Fixture::new();
    let ctr = Ctr::start(fx.spec(Limits {
        pids: Some(20),
        ..Limits::default()
    }));
    let r = sh(
        &ctr,
        "for i in $(seq 50); do sleep 2 & done; wait; echo done",
    );
    assert!(r.err.iter().any(|l| l.contains("fork")), "{r:?}");
    let dir = ctr
        .r()
        .cgroups
        .dirs()
        .iter()
        .find(|(c, _)| c == "pids")
        .map(|(_, d)| d.clone());
    let events = read(dir.expect("pids cgroup").join("pids.events"));
    assert!(!events.contains("max 0"), "no fork was refused: {events}");
}

#[test]
fn memory_limit_oom_kills_the_job_not_corex() {
    let fx = Fixture::new();
    let ctr = Ctr::start(fx.spec(Limits {
        memory: Some(32 << 20),
        ..Limits::default()
    }));
    // tail keeps the whole newline-free stream in memory.
    let r = sh(&ctr, "head -c 200m /dev/zero | tail > /dev/null");
    assert_eq!(r.code, Some(128 + libc::SIGKILL), "{r:?}");
    let dir = ctr
        .r()
        .cgroups
        .dirs()
        .iter()
        .find(|(c, _)| c == "memory")
        .map(|(_, d)| d.clone());
    let oom = read(dir.expect("memory cgroup").join("memory.oom_control"));
    assert!(!oom.contains("oom_kill 0"), "{oom}");
    let mut c = Client::connect(&ctr.r().socket()).expect("connect");
    assert_eq!(c.ping(Duration::from_secs(5)).expect("corex survives").0, 1);
}

#[test]
fn twenty_containers_start_stop_and_corex_memory() {
    let fx = Fixture::new();
    let mut ctrs: Vec<Ctr> = (0..20)
        .map(|_| {
            Ctr::start(fx.spec(Limits {
                memory: Some(64 << 20),
                pids: Some(100),
                cpu: Some(1.0),
            }))
        })
        .collect();
    for c in &ctrs {
        let mut cl = Client::connect(&c.r().socket()).expect("connect");
        assert_eq!(
            cl.ping(Duration::from_secs(5)).expect("pong").1,
            c.spec.hostname
        );
    }
    let pss = |ctrs: &[Ctr]| -> Vec<u64> {
        ctrs.iter()
            .map(|c| {
                let s = read(format!("/proc/{}/smaps_rollup", c.r().pid));
                s.lines()
                    .filter_map(|l| l.strip_prefix("Pss_Anon:"))
                    .filter_map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    .sum()
            })
            .collect()
    };
    let report = |when: &str, pss: &[u64]| {
        let total: u64 = pss.iter().sum();
        let max = pss.iter().max().copied().unwrap_or(0);
        println!(
            "corex Pss_Anon {when}: {} containers, total {total} kB, mean {} kB, max {max} kB",
            pss.len(),
            total / pss.len() as u64
        );
        max
    };
    let idle = report("idle after start", &pss(&ctrs));
    for c in &ctrs {
        assert_eq!(sh(c, "echo hi").out, ["hi"]);
    }
    let after = report("idle after one job", &pss(&ctrs));
    assert!(
        idle < 1024 && after < 1024,
        "corex uses {idle}/{after} kB Pss_Anon"
    );

    let pids: Vec<i32> = ctrs.iter().map(|c| c.r().pid).collect();
    let dirs: Vec<PathBuf> = ctrs.iter().map(|c| c.spec.dir.clone()).collect();
    let sets: Vec<_> = ctrs.iter_mut().map(|c| c.stop().cgroups).collect();
    for ((pid, dir), set) in pids.iter().zip(&dirs).zip(&sets) {
        assert!(!set.exists());
        assert!(runtime::find_running(dir).is_none());
        let gone = !pid_alive(*pid) || read(format!("/proc/{pid}/stat")).contains(") Z");
        assert!(gone, "corex {pid} still runs");
    }
    assert!(
        !runtime::host_mounts()
            .iter()
            .any(|m| m.starts_with(fx.tmp.path()))
    );
}

#[test]
fn failed_setup_leaves_nothing_behind() {
    let fx = Fixture::new();
    let spec = fx.spec(Limits {
        pids: Some(10),
        ..Limits::default()
    });
    // A directory where corex wants its socket: corex fails after the fork, inside its namespaces.
    std::fs::create_dir_all(spec.dir.join("corex.sock")).expect("mkdir");
    let _guard = Ctr {
        running: None,
        spec: spec.clone(),
    };
    let err = runtime().start(&spec).expect_err("start must fail");
    let msg = err.to_string();
    assert!(msg.contains("corex.sock"), "{msg}");
    let set = cgroups::CgroupSet::open(&layout(), &spec.cgroup_parent, spec.id).expect("open");
    assert!(!set.exists(), "cgroups left after a failed start");
    assert!(
        !runtime::host_mounts()
            .iter()
            .any(|m| m.starts_with(&spec.dir))
    );
    let cmdlines = std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| {
            c.windows(spec.dir.as_os_str().len())
                .any(|w| w == spec.dir.as_os_str().as_encoded_bytes())
        })
        .count();
    assert_eq!(cmdlines, 0, "a corex of the failed container still runs");
}

#[test]
fn privileged_host_network_container() {
    let fx = Fixture::new();
    let mut spec = fx.spec(Limits::default());
    spec.host_network = true;
    spec.privileged = true;
    let ctr = Ctr::start(spec);
    let pid = ctr.r().pid.to_string();
    assert_eq!(ns("self", "net"), ns(&pid, "net"));
    for kind in ["pid", "mnt", "uts", "ipc"] {
        assert_ne!(ns("self", kind), ns(&pid, kind), "{kind} ns");
    }
    let host_bnd = read("/proc/self/status")
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:").map(|v| v.trim().to_string()))
        .expect("CapBnd");
    let r = sh(
        &ctr,
        "grep -E 'CapBnd|NoNewPrivs' /proc/self/status; hostname",
    );
    assert!(
        r.out.contains(&format!("CapBnd:\t{host_bnd}")),
        "{:?}",
        r.out
    );
    assert!(
        r.out
            .iter()
            .any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('0')),
        "{:?}",
        r.out
    );
    assert_eq!(r.out.last(), Some(&ctr.spec.hostname));
    if let Ok(host) = std::fs::read("/etc/resolv.conf") {
        let inside = std::fs::read(format!("/proc/{pid}/root/etc/resolv.conf")).expect("resolv");
        assert_eq!(inside, host);
    }
}
