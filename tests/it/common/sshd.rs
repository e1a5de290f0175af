//! A real `sshd` on 127.0.0.1 with its own host key and config, and a real
//! unprivileged backup user that reads the source through ACLs — the setup
//! the docs describe, built per test and torn down after it.

use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{bin, scratch, sh};

/// A system user created for one test (no password, key auth only).
pub struct BackupUser {
    pub name: String,
}

/// Serializes useradd/userdel between test processes (they lock /etc/passwd).
fn with_user_db_lock<T>(f: impl FnOnce() -> T) -> T {
    let lock = File::options().create(true).write(true).truncate(false).open("/tmp/rbackup-tests-userdb.lock").unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    f()
}

impl BackupUser {
    pub fn create() -> BackupUser {
        let mut raw = [0u8; 4];
        rustix::rand::getrandom(&mut raw, rustix::rand::GetRandomFlags::empty()).unwrap();
        let name = format!("rbk{}", raw.iter().map(|b| format!("{b:02x}")).collect::<String>());
        with_user_db_lock(|| {
            let st = Command::new("useradd")
                .args(["--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/bin/sh", &name])
                .status()
                .unwrap();
            assert!(st.success(), "useradd {name} failed");
            // `*`: no password, but not locked, so key authentication works.
            let st = Command::new("usermod").args(["-p", "*", &name]).status().unwrap();
            assert!(st.success(), "usermod {name} failed");
        });
        BackupUser { name }
    }

    pub fn uid(&self) -> u32 {
        let out = Command::new("id").args(["-u", &self.name]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

impl BackupUser {
    /// A fresh name; the account is created by the test (`setup-server`).
    pub fn named() -> BackupUser {
        let mut raw = [0u8; 4];
        rustix::rand::getrandom(&mut raw, rustix::rand::GetRandomFlags::empty()).unwrap();
        BackupUser { name: format!("rbk{}", raw.iter().map(|b| format!("{b:02x}")).collect::<String>()) }
    }
}

impl Drop for BackupUser {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        let _ = Command::new("pkill").args(["-KILL", "-u", &self.name]).status();
        std::thread::sleep(Duration::from_millis(50));
        with_user_db_lock(|| {
            let _ = Command::new("userdel").arg("-f").arg(&self.name).stderr(Stdio::null()).status();
        });
    }
}

/// A running sshd for one test.
pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
    pub user: BackupUser,
    /// The desktop's private key for the backup user.
    pub client_key: PathBuf,
    /// The desktop's ssh config: `Host rbk-test` with port, user, key and
    /// known_hosts; pass it with `--ssh-config`.
    pub ssh_config: PathBuf,
    pub known_hosts: PathBuf,
    /// The agent binary, where the backup user can run it.
    pub agent: PathBuf,
    authorized_keys: PathBuf,
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "rbackup-test", "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Sshd {
    /// Starts sshd; no key is authorized until [`Sshd::authorize`].
    pub fn start() -> Sshd {
        Sshd::start_with(Some(BackupUser::create()))
    }

    /// Starts sshd for `setup-server` to configure: keys in each user's
    /// `~/.ssh/authorized_keys`, any user allowed; `user` names the account
    /// the test will create (and removes it afterwards).
    pub fn start_for_setup(user: BackupUser) -> Sshd {
        let mut s = Sshd::start_with(None);
        s.user = user;
        s
    }

    fn start_with(user: Option<BackupUser>) -> Sshd {
        super::require_root();
        let setup = user.is_none();
        let user = user.unwrap_or_else(|| BackupUser { name: String::new() });
        let dir = scratch();
        let d = dir.path();
        std::fs::create_dir_all("/run/sshd").unwrap();
        keygen(&d.join("host_key"));
        keygen(&d.join("id_ed25519"));
        std::fs::create_dir(d.join("bin")).unwrap();
        let agent = d.join("bin/rbackup");
        std::fs::copy(bin(), &agent).unwrap();
        sh(&format!("chmod 755 '{}'", agent.display()));
        let authorized_keys = d.join("authorized_keys");

        for _attempt in 0..5 {
            let port = free_port();
            let config = d.join("sshd_config");
            let (keys_file, allow) = if setup {
                (".ssh/authorized_keys".to_string(), String::new())
            } else {
                (format!("{}.%u", authorized_keys.display()), format!("AllowUsers {} root\n", user.name))
            };
            std::fs::write(
                &config,
                format!(
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {dir}/sshd.pid\n\
                     AuthorizedKeysFile {keys_file}\nStrictModes {strict}\nPasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nUsePAM no\n\
                     {allow}PermitRootLogin forced-commands-only\nLogLevel VERBOSE\n",
                    host_key = d.join("host_key").display(),
                    dir = d.display(),
                    strict = if setup { "yes" } else { "no" },
                ),
            )
            .unwrap();
            let log = File::create(d.join("sshd.log")).unwrap();
            let mut child = Command::new("/usr/sbin/sshd")
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut up = false;
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    up = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !up {
                let _ = child.kill();
                let _ = child.wait();
                continue;
            }
            let known_hosts = d.join("known_hosts");
            let host_pub = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
            let mut parts = host_pub.split_whitespace();
            let (kind, key) = (parts.next().unwrap(), parts.next().unwrap());
            std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {kind} {key}\n")).unwrap();
            let ssh_config = d.join("ssh_config");
            std::fs::write(
                &ssh_config,
                ["rbk-test", "rbk-root"]
                    .iter()
                    .map(|alias| {
                        format!(
                            "Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n  IdentityFile {key}\n  \
                             IdentitiesOnly yes\n  UserKnownHostsFile {kh}\n  StrictHostKeyChecking yes\n",
                            user = if *alias == "rbk-root" { "root" } else { user.name.as_str() },
                            key = d.join("id_ed25519").display(),
                            kh = known_hosts.display(),
                        )
                    })
                    .collect::<String>(),
            )
            .unwrap();
            return Sshd {
                client_key: d.join("id_ed25519"),
                dir,
                port,
                child,
                user,
                ssh_config,
                known_hosts,
                agent,
                authorized_keys,
            };
        }
        panic!("sshd did not start; see {}", d.join("sshd.log").display());
    }

    /// Authorizes the desktop's key for the backup user with these
    /// `authorized_keys` options (e.g. a forced command), replacing what was there.
    pub fn authorize(&self, options: &str) {
        self.authorize_for(&self.user.name, options);
    }

    /// The same for root, who may log in only with a forced command
    /// (`PermitRootLogin forced-commands-only`): the restore key.
    pub fn authorize_root(&self, options: &str) {
        self.authorize_for("root", options);
    }

    fn authorize_for(&self, user: &str, options: &str) {
        let key = std::fs::read_to_string(self.client_key.with_extension("pub")).unwrap();
        let line = if options.is_empty() { key } else { format!("{options} {key}") };
        let path = self.authorized_keys.with_extension(user);
        std::fs::File::create(&path).unwrap().write_all(line.as_bytes()).unwrap();
        sh(&format!("chmod 644 '{}'", path.display()));
    }

    /// The forced command that confines the restore key to writing beneath `root`.
    pub fn forced_write(&self, root: &Path) -> String {
        format!("restrict,command=\"{} serve --write --root {}\"", self.agent.display(), root.display())
    }

    /// The restore destination `path` on this server, as root.
    pub fn root_target(path: &Path) -> String {
        format!("rbk-root:{}", path.display())
    }

    /// The forced command that confines the key to reading `root`.
    pub fn forced_read_only(&self, root: &Path) -> String {
        format!("restrict,command=\"{} serve --read-only --root {}\"", self.agent.display(), root.display())
    }

    /// The source argument for `path` on this server.
    pub fn source(&self, path: &Path) -> String {
        format!("rbk-test:{}", path.display())
    }

    /// The extra arguments every test passes: the ssh config and the agent.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--ssh-config".into(),
            self.ssh_config.display().to_string(),
            "--remote-bin".into(),
            self.agent.display().to_string(),
        ]
    }

    /// Gives the backup user read access to `tree` the way the docs say:
    /// an access ACL on everything and a default ACL on directories.
    pub fn grant_read(&self, tree: &Path) {
        let u = &self.user.name;
        // `setfacl -R` gives up on paths longer than PATH_MAX; find -execdir
        // works from within each directory. Symlinks are skipped: setfacl
        // would follow them out of the tree.
        sh(&format!(
            "find '{0}' ! -type l -execdir setfacl -m u:{u}:rX {{}} + && \
             find '{0}' -type d -execdir setfacl -d -m u:{u}:rX {{}} +",
            tree.display()
        ));
    }

    /// What sshd logged, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
