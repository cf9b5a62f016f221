//! deploy/ and the README's quick start: every file in deploy/ parses, the
//! example configs load in `pgswitch check-config`, the Docker, systemd and
//! Kubernetes files agree with the configs they ship, the alert rules and the
//! Grafana dashboard use only metric names a running pgswitch exports, and
//! promtool accepts the Prometheus files. The quick start runs as printed.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use support::*;

const TOKEN: &str = "deploy-test-token";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(path: &str) -> PathBuf {
    root().join("deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every document of a YAML file, as JSON values.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

fn yaml(path: &str) -> Value {
    let mut docs = yaml_docs(&deploy(path));
    assert_eq!(docs.len(), 1, "{path}: one document expected");
    docs.remove(0)
}

fn toml_file(path: &Path) -> toml::Table {
    read(path)
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A tool the test needs: its path, or (outside CI) `None` after saying why
/// the check is skipped. Under CI=true a missing tool fails the test.
fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let why = missing_prerequisite(&format!("{name} (Debian package {package})"));
        assert!(!in_ci(), "{why}");
        eprintln!("SKIPPED: {why}");
    }
    found
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

// ------------------------------------------------------------- the configs

/// A listen address's port ("0.0.0.0:6432" -> 6432).
fn port_of(listen: &str) -> u16 {
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

fn listen_ports(config: &toml::Table) -> (u16, u16) {
    let proxy = config["proxy"]["listen"]
        .as_str()
        .unwrap_or("127.0.0.1:6432");
    let admin = config
        .get("admin")
        .and_then(|a| a.get("listen"))
        .and_then(|l| l.as_str())
        .unwrap_or("127.0.0.1:9930");
    (port_of(proxy), port_of(admin))
}

fn state_file(config: &toml::Table) -> PathBuf {
    PathBuf::from(
        config["cutover"]["state_file"]
            .as_str()
            .expect("[cutover] state_file"),
    )
}

/// Every `*_env` value in a config: the environment variables it needs.
fn env_names(value: &toml::Value, out: &mut BTreeSet<String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                if k.ends_with("_env") {
                    out.insert(v.as_str().expect("*_env is a string").to_owned());
                } else {
                    env_names(v, out);
                }
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|v| env_names(v, out)),
        _ => {}
    }
}

fn needed_env(config: &toml::Table) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    env_names(&toml::Value::Table(config.clone()), &mut out);
    out
}

/// The ConfigMap's embedded proxy.toml.
fn configmap_toml() -> String {
    yaml("kubernetes/configmap.yaml")["data"]["proxy.toml"]
        .as_str()
        .expect("data.proxy.toml")
        .to_owned()
}

/// The environment the Deployment gives the container: name -> the value of
/// the Secret key it refers to (each of which must exist).
fn deployment_env() -> BTreeMap<String, String> {
    let secret = yaml("kubernetes/secret.yaml");
    assert_eq!(secret["kind"], "Secret");
    let deployment = yaml("kubernetes/deployment.yaml");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let mut env = BTreeMap::new();
    for var in container["env"].as_array().expect("env") {
        let name = var["name"].as_str().unwrap().to_owned();
        let key_ref = &var["valueFrom"]["secretKeyRef"];
        assert_eq!(key_ref["name"], secret["metadata"]["name"], "{name}");
        let key = key_ref["key"].as_str().unwrap();
        let value = secret["stringData"][key]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: key {key} is not in secret.yaml"));
        env.insert(name, value.to_owned());
    }
    env
}

/// `KEY=value` lines of an environment file.
fn env_file(path: &Path) -> BTreeMap<String, String> {
    read(path)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{l:?}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// Runs `pgswitch check-config` on `text` with `env`, the state file moved
/// into a temporary folder (its real folder, /var/lib/pgswitch, exists only
/// where pgswitch is installed).
fn check_config(name: &str, text: &str, env: &BTreeMap<String, String>) {
    let config: toml::Table = text.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
    let needed = needed_env(&config);
    let missing: Vec<_> = needed.iter().filter(|n| !env.contains_key(*n)).collect();
    assert!(missing.is_empty(), "{name}: nothing sets {missing:?}");
    let dir = tempfile::tempdir().unwrap();
    let state = state_file(&config);
    let moved = dir.path().join(state.file_name().unwrap());
    let text = text.replace(
        &format!("\"{}\"", state.display()),
        &format!("\"{}\"", moved.display()),
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    let bin = env!("CARGO_BIN_EXE_pgswitch");
    let check = |env: &BTreeMap<String, String>| {
        run(Command::new(bin)
            .args(["check-config", "--config"])
            .arg(&path)
            .env_clear()
            .envs(env))
    };
    let (ok, out) = check(env);
    assert!(ok, "{name}: check-config failed: {out}");
    // The *_env keys are really read: without the variables it fails.
    if let Some(first) = needed.iter().next() {
        let mut without = env.clone();
        without.remove(first);
        let (ok, out) = check(&without);
        assert!(!ok && out.contains(first.as_str()), "{name}: {out}");
    }
}

#[test]
fn every_file_in_deploy_parses() {
    let mut checked = Vec::new();
    for path in files_under(&root().join("deploy")) {
        let name = path.strip_prefix(root()).unwrap().display().to_string();
        let file = path.file_name().unwrap().to_str().unwrap();
        let text = read(&path);
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => {
                let docs = yaml_docs(&path);
                assert!(!docs.is_empty(), "{name}: empty");
            }
            Some("json") => {
                serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            Some("toml") => {
                toml_file(&path);
            }
            Some("service") => {
                unit_file(&path);
            }
            Some("example") if file.ends_with(".env.example") => {
                assert!(!env_file(&path).is_empty(), "{name}");
            }
            _ if file == "Dockerfile" => {
                dockerfile_stages(&path);
            }
            _ => panic!("{name}: no test knows this kind of file; add a check to tests/deploy.rs"),
        }
        checked.push(name);
    }
    eprintln!("parsed: {checked:#?}");
    for expected in [
        "deploy/docker/Dockerfile",
        "deploy/systemd/pgswitch.service",
        "deploy/kubernetes/deployment.yaml",
        "deploy/prometheus/pgswitch-rules.yml",
        "deploy/grafana/pgswitch.json",
    ] {
        assert!(checked.iter().any(|c| c == expected), "{expected}");
    }
}

#[test]
fn example_configs_pass_check_config() {
    // The image's default config: the variables a `docker run -e` passes.
    let docker = read(&deploy("docker/proxy.toml"));
    let dummy = |config: &str| -> BTreeMap<String, String> {
        needed_env(&config.parse().unwrap())
            .into_iter()
            .map(|n| (n, "example-secret".to_owned()))
            .collect()
    };
    check_config("deploy/docker/proxy.toml", &docker, &dummy(&docker));
    // systemd: the variables of the EnvironmentFile example.
    let systemd_env = env_file(&deploy("systemd/pgswitch.env.example"));
    check_config(
        "deploy/systemd/proxy.toml",
        &read(&deploy("systemd/proxy.toml")),
        &systemd_env,
    );
    // Kubernetes: what the Deployment sets from the Secret.
    check_config(
        "deploy/kubernetes/configmap.yaml",
        &configmap_toml(),
        &deployment_env(),
    );
    // And the annotated reference itself.
    let (ok, out) = run(Command::new(env!("CARGO_BIN_EXE_pgswitch"))
        .args(["check-config", "--config"])
        .arg(root().join("proxy.toml")));
    assert!(ok, "proxy.toml: {out}");
}

// --------------------------------------------------------------- Dockerfile

#[derive(Debug)]
struct Stage {
    from: String,
    name: Option<String>,
    /// (instruction, arguments), continuation lines joined.
    instructions: Vec<(String, String)>,
}

fn dockerfile_stages(path: &Path) -> Vec<Stage> {
    let text = read(path);
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            logical.push(std::mem::take(&mut current));
        }
    }
    assert!(current.is_empty(), "a continuation line ends the file");
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical {
        let (instr, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let instr = instr.to_uppercase();
        let args = args.trim().to_owned();
        if instr == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                [_] => None,
                _ => panic!("FROM {args}"),
            };
            stages.push(Stage {
                from: words[0].to_owned(),
                name,
                instructions: Vec::new(),
            });
        } else {
            let stage = stages.last_mut().expect("an instruction before FROM");
            stage.instructions.push((instr, args));
        }
    }
    stages
}

impl Stage {
    fn all(&self, instr: &str) -> Vec<&str> {
        self.instructions
            .iter()
            .filter(|(i, _)| i == instr)
            .map(|(_, a)| a.as_str())
            .collect()
    }

    fn one(&self, instr: &str) -> &str {
        let all = self.all(instr);
        assert_eq!(all.len(), 1, "{instr}: {all:?}");
        all[0]
    }
}

/// A JSON-array (exec form) argument list.
fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("not exec form: {args}: {e}"))
}

/// The HEALTHCHECK's command line, its options stripped.
fn healthcheck_command(runtime: &Stage) -> Vec<String> {
    let hc = runtime.one("HEALTHCHECK");
    let cmd = hc
        .split_once("CMD ")
        .unwrap_or_else(|| panic!("HEALTHCHECK without CMD: {hc}"))
        .1;
    exec_form(cmd)
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_a_health_check() {
    let stages = dockerfile_stages(&deploy("docker/Dockerfile"));
    assert!(stages.len() >= 2, "{stages:#?}");
    let builder = &stages[0];
    let builder_name = builder.name.as_deref().expect("the build stage is named");
    assert!(builder.from.starts_with("rust:"), "{}", builder.from);
    assert!(
        builder
            .all("RUN")
            .iter()
            .any(|r| r.contains("cargo build --release --locked")),
        "{builder:#?}"
    );
    let runtime = stages.last().unwrap();
    assert!(
        ["debian:", "gcr.io/distroless/cc"]
            .iter()
            .any(|b| runtime.from.starts_with(b)),
        "runtime base: {}",
        runtime.from
    );
    assert!(
        runtime
            .all("COPY")
            .iter()
            .any(|c| c.starts_with(&format!("--from={builder_name} "))),
        "the runtime copies the binary from the build stage"
    );
    let user = runtime.one("USER");
    let user_name = user.split(':').next().unwrap();
    assert!(!["root", "0", ""].contains(&user_name), "USER {user}");
    // The user is created with a fixed, non-zero uid (Kubernetes'
    // runAsUser refers to it).
    let uid = runtime
        .all("RUN")
        .iter()
        .find_map(|r| {
            r.split("useradd")
                .nth(1)
                .and_then(|rest| rest.split("--uid ").nth(1))
                .and_then(|u| u.split_whitespace().next())
                .map(|u| u.parse::<u32>().unwrap())
        })
        .expect("useradd --uid");
    assert_ne!(uid, 0);
    let pod = &yaml("kubernetes/deployment.yaml")["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsUser"], uid);

    // The image's config: where CMD points, what EXPOSE and HEALTHCHECK use.
    let config = toml_file(&deploy("docker/proxy.toml"));
    let (proxy_port, admin_port) = listen_ports(&config);
    let cmd = exec_form(runtime.one("CMD"));
    let config_path = &cmd[cmd.iter().position(|a| a == "--config").unwrap() + 1];
    assert!(
        runtime
            .all("COPY")
            .iter()
            .any(|c| c == &format!("deploy/docker/proxy.toml {config_path}")),
        "the default config is copied to {config_path}"
    );
    let entry = exec_form(runtime.one("ENTRYPOINT"));
    assert_eq!(cmd[0], "run", "{entry:?} {cmd:?}");
    let exposed: BTreeSet<u16> = runtime
        .all("EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    assert_eq!(exposed, BTreeSet::from([proxy_port, admin_port]));
    let volumes: Vec<String> = runtime
        .all("VOLUME")
        .iter()
        .flat_map(|v| exec_form(v))
        .collect();
    let state_dir = state_file(&config).parent().unwrap().to_owned();
    assert!(
        volumes.iter().any(|v| Path::new(v) == state_dir),
        "VOLUME {volumes:?} holds {}",
        state_dir.display()
    );
    let health = healthcheck_command(runtime).join(" ");
    assert!(health.contains("/health"), "{health}");
    assert!(
        health.contains(&format!("/dev/tcp/127.0.0.1/{admin_port}")),
        "the health check calls the admin port {admin_port}: {health}"
    );
    // Secrets are never baked into the image.
    assert!(
        stages.iter().all(|s| s.all("ENV").is_empty()
            && s.all("ARG")
                .iter()
                .all(|a| !a.to_lowercase().contains("password"))),
        "no ENV or password ARG in the Dockerfile"
    );
    // The build context the Dockerfile copies from is what .dockerignore lets in.
    let ignore = read(&root().join(".dockerignore"));
    for needed in [
        "!Cargo.toml",
        "!Cargo.lock",
        "!src/",
        "!deploy/docker/proxy.toml",
    ] {
        assert!(
            ignore.lines().any(|l| l == needed),
            ".dockerignore: {needed}"
        );
    }
}

// ------------------------------------------------------------------ systemd

/// A unit file: section -> [(key, value)], in order.
fn unit_file(path: &Path) -> BTreeMap<String, Vec<(String, String)>> {
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut section = None;
    for line in read(path).lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_owned());
            sections.entry(name.to_owned()).or_default();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{}: not key=value: {line}", path.display()));
        let section = section
            .as_ref()
            .unwrap_or_else(|| panic!("{}: key before a section", path.display()));
        sections
            .get_mut(section)
            .unwrap()
            .push((k.trim().to_owned(), v.trim().to_owned()));
    }
    sections
}

#[test]
fn systemd_unit_is_hardened_and_points_at_its_config() {
    let path = deploy("systemd/pgswitch.service");
    let unit = unit_file(&path);
    assert_eq!(
        unit.keys().map(String::as_str).collect::<Vec<_>>(),
        ["Install", "Service", "Unit"]
    );
    let service: BTreeMap<&str, Vec<&str>> =
        unit["Service"]
            .iter()
            .fold(BTreeMap::new(), |mut m, (k, v)| {
                m.entry(k.as_str()).or_default().push(v.as_str());
                m
            });
    let one = |k: &str| -> &str {
        let v = service
            .get(k)
            .unwrap_or_else(|| panic!("[Service] {k} missing"));
        assert_eq!(v.len(), 1, "{k}: {v:?}");
        v[0]
    };
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("Restart", "on-failure"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("User", "pgswitch"),
    ] {
        assert_eq!(one(key), value, "[Service] {key}");
    }
    assert!(one("LimitNOFILE").parse::<u64>().unwrap() >= 10_000);
    // The config it runs is the example beside it, installed where ExecStart says.
    let exec = one("ExecStart");
    assert_eq!(
        exec,
        "/usr/local/bin/pgswitch run --config /etc/pgswitch/proxy.toml"
    );
    let config = toml_file(&deploy("systemd/proxy.toml"));
    let state_dir = state_file(&config).parent().unwrap().display().to_string();
    // The only writable path is the state file's folder.
    assert_eq!(one("ReadWritePaths"), state_dir);
    assert_eq!(format!("/var/lib/{}", one("StateDirectory")), state_dir);
    // Stopping waits longer than the drain.
    let stop: u64 = one("TimeoutStopSec").trim_end_matches('s').parse().unwrap();
    assert!(
        stop > 30,
        "TimeoutStopSec {stop} <= shutdown_timeout (30 s)"
    );
    // The environment file's example sets every *_env the config names.
    let env = env_file(&deploy("systemd/pgswitch.env.example"));
    for name in needed_env(&config) {
        assert!(env.contains_key(&name), "pgswitch.env.example lacks {name}");
    }

    // systemd's own check, on a copy whose binary and environment file exist
    // on this machine. It reports unknown keys and bad values on stderr.
    let Some(analyze) = tool("systemd-analyze", "systemd").or_else(|| {
        eprintln!("(the unit's sections and keys were checked above)");
        None
    }) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("pgswitch.service");
    let text = read(&path)
        .replace("/usr/local/bin/pgswitch", env!("CARGO_BIN_EXE_pgswitch"))
        .replace(
            "EnvironmentFile=/etc/pgswitch/pgswitch.env",
            &format!(
                "EnvironmentFile={}",
                deploy("systemd/pgswitch.env.example").display()
            ),
        );
    std::fs::write(&copy, text).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&copy)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
}

// --------------------------------------------------------------- Kubernetes

#[test]
fn kubernetes_manifests_agree_with_the_config() {
    let dir = deploy("kubernetes");
    let kustomization = yaml("kubernetes/kustomization.yaml");
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let present: BTreeSet<String> = files_under(&dir)
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
        .filter(|f| f != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization.yaml lists every manifest");
    let mut kinds = BTreeMap::new();
    for file in &present {
        for doc in yaml_docs(&dir.join(file)) {
            let kind = doc["kind"].as_str().unwrap().to_owned();
            assert!(doc["apiVersion"].is_string(), "{file}");
            assert!(doc["metadata"]["name"].is_string(), "{file}");
            kinds.insert(kind, doc);
        }
    }
    assert_eq!(
        kinds.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "ConfigMap",
            "Deployment",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "Secret",
            "Service"
        ]
    );
    let config: toml::Table = configmap_toml().parse().unwrap();
    let (proxy_port, admin_port) = listen_ports(&config);

    let deployment = &kinds["Deployment"];
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 1, "one pgswitch per state file");
    assert_eq!(spec["strategy"]["type"], "Recreate");
    let pod = &spec["template"]["spec"];
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(&spec["selector"]["matchLabels"], labels);
    let container = &pod["containers"][0];
    let ports: BTreeMap<String, u64> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([
            ("admin".to_owned(), u64::from(admin_port)),
            ("postgres".to_owned(), u64::from(proxy_port)),
        ])
    );
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/health")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], "admin", "{probe}");
    }
    for key in ["requests", "limits"] {
        assert!(
            container["resources"][key]["memory"].is_string(),
            "resources.{key}.memory"
        );
    }
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    // Stopping waits longer than the drain.
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > 30);
    // Volumes: the config from the ConfigMap where --config points, the state
    // file's folder from the PVC.
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let config_path = Path::new(args[args.iter().position(|a| *a == "--config").unwrap() + 1]);
    let mounts: BTreeMap<&str, &str> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap(),
                m["mountPath"].as_str().unwrap(),
            )
        })
        .collect();
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    let config_volume = volumes[mounts
        .iter()
        .find(|(_, p)| Path::new(p) == config_path.parent().unwrap())
        .expect("a mount at the config's folder")
        .0];
    assert_eq!(
        config_volume["configMap"]["name"],
        kinds["ConfigMap"]["metadata"]["name"]
    );
    assert_eq!(config_path.file_name().unwrap(), "proxy.toml");
    let state_dir = state_file(&config).parent().unwrap().to_owned();
    let state_volume = volumes[mounts
        .iter()
        .find(|(_, p)| Path::new(p) == state_dir)
        .expect("a mount at the state file's folder")
        .0];
    assert_eq!(
        state_volume["persistentVolumeClaim"]["claimName"],
        kinds["PersistentVolumeClaim"]["metadata"]["name"]
    );
    // Every *_env of the config comes from the Secret.
    let env = deployment_env();
    for name in needed_env(&config) {
        assert!(
            env.contains_key(&name),
            "the Deployment does not set {name}"
        );
    }
    // The Service selects the pod and targets its named ports.
    let service = &kinds["Service"]["spec"];
    assert_eq!(&service["selector"], labels);
    for port in service["ports"].as_array().unwrap() {
        let target = port["targetPort"].as_str().unwrap();
        assert_eq!(
            port["port"].as_u64(),
            ports.get(target).copied(),
            "Service port {target}"
        );
    }
    // The PodDisruptionBudget covers the pod.
    let pdb = &kinds["PodDisruptionBudget"]["spec"];
    assert_eq!(&pdb["selector"]["matchLabels"], labels);
    assert!(pdb["minAvailable"].is_number() || pdb["maxUnavailable"].is_number());

    // kustomize's own build, where kubectl is installed (it needs no cluster).
    match tool_optional("kubectl") {
        Some(kubectl) => {
            let (ok, out) = run(Command::new(kubectl).arg("kustomize").arg(&dir));
            assert!(ok, "kubectl kustomize: {out}");
            assert_eq!(
                out.matches("\nkind: ").count() + usize::from(out.starts_with("kind: ")),
                6,
                "{out}"
            );
        }
        None => eprintln!("kubectl is not installed: `kubectl kustomize` not run"),
    }
}

/// A tool that only adds a check where it happens to be installed.
fn tool_optional(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

// --------------------------------------------------- Prometheus and Grafana

/// The metric names in a PromQL expression (every `pgswitch_...` word).
fn metric_names(expr: &str, out: &mut BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("pgswitch_") {
        let start = i + at;
        let word_start = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_')
        };
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if word_start {
            out.insert(expr[start..end].to_owned());
        }
        i = end;
    }
}

/// Every string under a key named `expr` or `query` (and `definition`) in
/// a JSON value: the PromQL of alert rules and dashboard panels.
fn exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The series names a /metrics text holds: samples, and for each `# TYPE`
/// the names its type produces (a family without samples yet included).
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (name, kind) = (words.next().unwrap(), words.next().unwrap());
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_dashboard_use_only_exported_metrics() {
    let pg = pg_with_app(PgOptions::default(), None);
    let state = tempfile::tempdir().unwrap();
    let proxy = ProxyConfig::new(pg.port)
        .app_user()
        .backend("green", free_port())
        .table(&format!(
            "[cutover]\nstate_file = \"{}\"\n",
            state.path().join("state.json").display()
        ))
        .admin(free_port(), &format!("token = \"{TOKEN}\""))
        .start();
    // Some traffic, so that the counters have samples.
    let client = connect_with(&client_config(
        proxy.port,
        APP_USER,
        Some(APP_PASSWORD),
        "postgres",
    ))
    .await
    .expect("connect through pgswitch");
    client.simple_query("SELECT 1").await.unwrap();

    let (code, text) = admin_http(proxy.admin_port, "GET", "/metrics", Some(TOKEN), "").await;
    assert_eq!(code, 200, "{text}");
    let exported = exported_names(&text);
    for sample in [
        "pgswitch_transactions_total",
        "pgswitch_backend_up",
        "pgswitch_fenced",
        "pgswitch_fallback_window_seconds",
        "pgswitch_cutovers_total",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(sample)),
            "{sample} has no sample:\n{text}"
        );
    }
    assert!(
        text.lines().any(
            |l| l.starts_with("pgswitch_cutovers_total{kind=\"cutover\"")
                && l.ends_with("outcome=\"aborted\"} 0")
        ),
        "the aborted outcome exists before the first abort:\n{text}"
    );

    let mut sources: Vec<(String, Vec<String>)> = Vec::new();
    let rules_path = "prometheus/pgswitch-rules.yml";
    let mut found = Vec::new();
    exprs(&yaml(rules_path), &mut found);
    sources.push((rules_path.to_owned(), found));
    let dashboard: Value = serde_json::from_str(&read(&deploy("grafana/pgswitch.json"))).unwrap();
    let mut found = Vec::new();
    exprs(&dashboard, &mut found);
    sources.push(("grafana/pgswitch.json".to_owned(), found));
    let mut used_anywhere = BTreeSet::new();
    for (path, found) in &sources {
        assert!(!found.is_empty(), "{path}: no expressions");
        let mut used = BTreeSet::new();
        for e in found {
            metric_names(e, &mut used);
        }
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{path} uses metrics pgswitch does not export: {unknown:?}\nexported: {exported:?}"
        );
        used_anywhere.extend(used);
    }
    eprintln!("metrics used: {used_anywhere:?}");
    // The dashboard shows what the issue asks for.
    let mut dash_used = BTreeSet::new();
    for e in &sources[1].1 {
        metric_names(e, &mut dash_used);
    }
    for needed in [
        "pgswitch_replication_lag_bytes",
        "pgswitch_clients",
        "pgswitch_server_connections",
        "pgswitch_transactions_total",
        "pgswitch_errors_total",
        "pgswitch_cutovers_total",
        "pgswitch_pause_duration_seconds_bucket",
        "pgswitch_backend_up",
    ] {
        assert!(dash_used.contains(needed), "the dashboard lacks {needed}");
    }
    // Every panel queries the same data source input.
    let panels = dashboard["panels"].as_array().unwrap();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        assert!(
            !p["targets"].as_array().unwrap().is_empty(),
            "{}",
            p["title"]
        );
    }

    // The image's HEALTHCHECK command, run against this pgswitch's admin
    // port: it passes while pgswitch serves, and fails once it is gone.
    let runtime = dockerfile_stages(&deploy("docker/Dockerfile"))
        .pop()
        .unwrap();
    let (_, admin_port) = listen_ports(&toml_file(&deploy("docker/proxy.toml")));
    let health: Vec<String> = healthcheck_command(&runtime)
        .into_iter()
        .map(|a| {
            a.replace(
                &format!("/dev/tcp/127.0.0.1/{admin_port}"),
                &format!("/dev/tcp/127.0.0.1/{}", proxy.admin_port),
            )
        })
        .collect();
    let (ok, out) = run(Command::new(&health[0]).args(&health[1..]));
    assert!(ok, "HEALTHCHECK failed against a running pgswitch: {out}");
    let admin = proxy.admin_port;
    drop(client);
    drop(proxy);
    wait_until_sync(Duration::from_secs(10), "the admin port closes", || {
        !wait_for_port(admin, Duration::ZERO)
    });
    let (ok, _) = run(Command::new(&health[0]).args(&health[1..]));
    assert!(!ok, "HEALTHCHECK passed with pgswitch stopped");
}

#[test]
fn promtool_accepts_the_prometheus_files() {
    let Some(promtool) = tool("promtool", "prometheus") else {
        return;
    };
    let rules = deploy("prometheus/pgswitch-rules.yml");
    let (ok, out) = run(Command::new(&promtool).args(["check", "rules"]).arg(&rules));
    assert!(ok, "promtool check rules: {out}");
    // The rules' unit tests: each alert fires on the series meant to raise it.
    let (ok, out) = run(Command::new(&promtool)
        .args(["test", "rules"])
        .arg(deploy("prometheus/pgswitch-rules.test.yml")));
    assert!(ok, "promtool test rules: {out}");
    // promtool check config also checks that the files the config names
    // exist: a copy beside the rules, with the token file in a temp folder.
    let config = read(&deploy("prometheus/prometheus.yml"));
    let token_path = "/etc/prometheus/pgswitch-admin-token";
    assert!(config.contains(token_path));
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    std::fs::copy(&rules, dir.path().join("pgswitch-rules.yml")).unwrap();
    let copy = dir.path().join("prometheus.yml");
    std::fs::write(
        &copy,
        config.replace(token_path, &token.display().to_string()),
    )
    .unwrap();
    let (ok, out) = run(Command::new(&promtool).args(["check", "config"]).arg(&copy));
    assert!(ok, "promtool check config: {out}");
    assert!(out.contains("SUCCESS: 1 rule files found"), "{out}");
}

// -------------------------------------------------------------- quick start

/// Stops what the quick start started if the test fails half-way.
struct QuickStartCleanup {
    data: PathBuf,
    script: Option<std::process::Child>,
}

impl Drop for QuickStartCleanup {
    fn drop(&mut self) {
        if let Some(mut child) = self.script.take() {
            // The script runs in its own process group: pgswitch with it.
            let _ = send_signal_group(child.id(), SIGKILL);
            let _ = child.wait();
        }
        if self.data.join("postmaster.pid").exists() {
            let mut stop = Command::new(pg15_bin_dir().join("pg_ctl"));
            stop.arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Some(uid) = postgres_uid() {
                use std::os::unix::process::CommandExt;
                stop.uid(uid.0).gid(uid.1);
            }
            let _ = stop.status();
        }
    }
}

fn send_signal_group(pid: u32, sig: i32) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(format!("-{pid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The `postgres` OS user's (uid, gid) when this test runs as root.
fn postgres_uid() -> Option<(u32, u32)> {
    let status = read(Path::new("/proc/self/status"));
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|r| r.split_whitespace().next())?;
    if uid != "0" {
        return None;
    }
    let passwd = read(Path::new("/etc/passwd"));
    let f: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))?
        .split(':')
        .collect();
    Some((f[2].parse().ok()?, f[3].parse().ok()?))
}

/// The README's quick start, run as printed with bash, with only these
/// changes: its fixed ports (5432, 6432, and the admin API's 9930 in
/// proxy.toml) become free ones, /tmp/blue a temporary folder, and
/// `cargo build --release` / `./target/release/pgswitch` the binary under
/// test (a release build would take minutes).
#[test]
fn readme_quick_start_runs_as_printed() {
    let readme = read(&root().join("README.md"));
    let section = &readme[readme.find("## Quick start").expect("a quick start")..];
    let block = section
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```\n"))
        .expect("a ```sh block in the quick start")
        .0;
    let base = tempfile::Builder::new()
        .prefix("pgswitch-quickstart-")
        .tempdir_in(test_tmp_base())
        .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    if let Some((uid, gid)) = postgres_uid() {
        std::os::unix::fs::chown(base.path(), Some(uid), Some(gid)).unwrap();
    }
    let (pg_port, proxy_port, admin_port, green_port) =
        (free_port(), free_port(), free_port(), free_port());
    let blue = base.path().join("blue");
    let bin = env!("CARGO_BIN_EXE_pgswitch");
    let script = block
        .replace("/tmp/blue", &blue.display().to_string())
        .replace("-p 5432", &format!("-p {pg_port}"))
        .replace("-p 6432", &format!("-p {proxy_port}"))
        .replace("cargo build --release", "true")
        .replace("./target/release/pgswitch", bin);
    for (printed, fixed) in [("-p 5432", pg_port), ("-p 6432", proxy_port)] {
        assert!(
            block.contains(printed),
            "the quick start no longer uses {printed}"
        );
        assert!(script.contains(&format!("-p {fixed}")));
    }
    // The shipped proxy.toml, on the same free ports.
    let config = read(&root().join("proxy.toml"));
    let mut replaced = config.clone();
    for (from, to) in [
        (
            "listen = \"127.0.0.1:6432\"",
            format!("listen = \"127.0.0.1:{proxy_port}\""),
        ),
        ("port = 5432", format!("port = {pg_port}")),
        ("port = 5433", format!("port = {green_port}")),
        (
            "listen = \"127.0.0.1:9930\"",
            format!("listen = \"127.0.0.1:{admin_port}\""),
        ),
    ] {
        assert_eq!(config.matches(from).count(), 1, "proxy.toml: {from}");
        replaced = replaced.replace(from, &to);
    }
    let work = base.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::write(work.join("proxy.toml"), replaced).unwrap();
    eprintln!("---- quick start, as run ----\n{script}----");

    use std::os::unix::process::CommandExt;
    let log = base.path().join("quickstart.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut cleanup = QuickStartCleanup {
        data: blue.clone(),
        script: None,
    };
    let child = Command::new("bash")
        .args(["-e", "-c", &script])
        .current_dir(&work)
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGDATA")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .process_group(0)
        .spawn()
        .expect("spawn bash");
    cleanup.script = Some(child);
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(st) = cleanup.script.as_mut().unwrap().try_wait().unwrap() {
            cleanup.script = None;
            break Some(st);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = read(&log);
    eprintln!("---- quick start output ----\n{output}----");
    let status = status.unwrap_or_else(|| panic!("the quick start ran over 3 minutes:\n{output}"));
    assert!(
        status.success(),
        "the quick start failed ({status}):\n{output}"
    );
    // psql printed the server's version through pgswitch, pgbench ran without
    // failed transactions.
    assert!(
        output.contains(" version ") || output.contains("PostgreSQL 1"),
        "{output}"
    );
    assert!(
        output.contains("number of failed transactions: 0"),
        "{output}"
    );
    assert!(!blue.join("postmaster.pid").exists(), "blue was stopped");
}
