//! `cargo xtask package`: the `xdp-nat` Debian package, built from the workspace.
//!
//! Assembled with `dpkg-deb` rather than cargo-deb: the package needs a man page generated
//! from the binary's own `--help` (the CLI is defined in the agent's `main.rs`, out of reach
//! of clap_mangen here), hand-written maintainer scripts, and a debug-profile build for the
//! test (cargo-deb refuses the dev profile). What debhelper would add is done the same way:
//! `dpkg-shlibdeps` for the library dependencies, stripped binary, compressed docs,
//! md5sums, root-owned files.
//!
//! Layout (Debian 12):
//!
//! | path | from |
//! |---|---|
//! | `/usr/sbin/nat-agent` | the build (stripped) |
//! | `/lib/systemd/system/xdp-nat.service` | `deploy/systemd/` |
//! | `/usr/lib/sysctl.d/90-xdp-nat.conf` | `deploy/sysctl/` |
//! | `/etc/xdp-nat/nat.toml` (conffile) | `deploy/packaging/nat.toml` |
//! | `/usr/share/man/man8/nat-agent.8.gz` | generated from `nat-agent ... --help` |
//! | `/usr/share/doc/xdp-nat/` | README, copyright, changelog, `examples/` (`deploy/examples/`) |

use std::{
    env,
    fmt::Write as _,
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};

/// The Debian package name (also the unit's and the config directory's).
pub const PACKAGE: &str = "xdp-nat";
/// The Debian revision appended to the workspace version.
const REVISION: &str = "1";
/// Who answers for the package (the workspace has no authors field).
const MAINTAINER: &str = "xdp-nat maintainers <xdp-nat@example.invalid>";
/// `deb-systemd-helper debian-installed` and `deb-systemd-invoke` in the maintainer scripts.
const INIT_SYSTEM_HELPERS: &str = "init-system-helpers (>= 1.54~)";

/// Options of `cargo xtask package`.
#[derive(Debug, Args)]
pub struct PackageArgs {
    /// Cargo profile of the packaged binary. `dev` is for tests: quick to build, the same
    /// files and scripts, only the binary is unoptimised.
    #[arg(long, value_enum, default_value_t = Profile::Release)]
    profile: Profile,

    /// Where the .deb goes [default: target/debian].
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

/// The two Cargo profiles a package can be built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// `cargo build --release`: what ships.
    Release,
    /// `cargo build`: for tests.
    Dev,
}

impl Profile {
    fn cargo_name(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Dev => "dev",
        }
    }

    fn target_subdir(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Dev => "debug",
        }
    }
}

/// Tools the build runs, with the Debian package that has each.
const TOOLS: &[(&str, &str)] = &[
    ("dpkg-deb", "dpkg"),
    ("dpkg", "dpkg"),
    ("dpkg-shlibdeps", "dpkg-dev"),
    ("strip", "binutils"),
    ("gzip", "gzip"),
    ("md5sum", "coreutils"),
];

/// Entry point of `cargo xtask package`: builds the agent and the .deb, prints its path last.
pub fn package(args: &PackageArgs) -> Result<()> {
    require_tools()?;
    let root = workspace_root()?;
    let target = target_dir(&root);
    let out_dir = args
        .out_dir
        .clone()
        .unwrap_or_else(|| target.join("debian"));
    let binary = build_agent(&root, &target, args.profile)?;
    let deb = build_deb(&root, &binary, &out_dir)?;
    println!("{}", deb.display());
    Ok(())
}

fn require_tools() -> Result<()> {
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(tool, _)| nat_lab::tools::find_tool(tool).is_none())
        .map(|(tool, package)| format!("{tool} (Debian package {package})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools needed to build the package: {}; run scripts/bootstrap.sh (as root)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// The workspace root, known at compile time (xtask lives one level below it).
fn workspace_root() -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .with_context(|| format!("{} has no parent directory", manifest.display()))
}

/// Cargo resolves a relative CARGO_TARGET_DIR against its working directory: the root.
fn target_dir(root: &Path) -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(|dir| root.join(dir))
        .unwrap_or_else(|| root.join("target"))
}

/// `cargo build --locked -p nat-agent --profile P`; returns the binary. Cheap when the
/// binary is already built (the test suite builds the dev one anyway).
fn build_agent(root: &Path, target: &Path, profile: Profile) -> Result<PathBuf> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!(
        "xtask: cargo build --locked -p nat-agent --profile {}",
        profile.cargo_name()
    );
    let status = Command::new(&cargo)
        .current_dir(root)
        .args(["build", "--locked", "-p", "nat-agent", "--profile"])
        .arg(profile.cargo_name())
        .status()
        .with_context(|| format!("cannot run {}", Path::new(&cargo).display()))?;
    ensure!(
        status.success(),
        "`cargo build -p nat-agent` failed ({status})"
    );
    let binary = target.join(profile.target_subdir()).join("nat-agent");
    ensure!(
        binary.is_file(),
        "cargo built nat-agent, but {} does not exist",
        binary.display()
    );
    Ok(binary)
}

/// Runs `cmd`, failing with its stderr unless it exits 0.
fn run(cmd: &mut Command) -> Result<Output> {
    let line = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn stdout_of(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    String::from_utf8(out.stdout).context("output is not UTF-8")
}

/// Stages the package tree next to the .deb, builds it, removes the tree; returns the .deb.
fn build_deb(root: &Path, binary: &Path, out_dir: &Path) -> Result<PathBuf> {
    // The version the binary reports is the one the package gets: they cannot disagree.
    let version_line = stdout_of(Command::new(binary).arg("--version"))?;
    let version = version_line
        .trim()
        .strip_prefix("nat-agent ")
        .with_context(|| format!("unexpected `nat-agent --version` output {version_line:?}"))?
        .to_owned();
    let deb_version = format!("{version}-{REVISION}");
    let arch = stdout_of(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_owned();
    let dates = Dates::of_source(root)?;

    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    // dpkg-shlibdeps wants debian/control and the package tree at debian/<package>, as in a
    // source package.
    let work = out_dir.join(format!("{PACKAGE}.build"));
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    let tree = work.join("debian").join(PACKAGE);
    let result = stage_and_build(
        root,
        binary,
        &work,
        &tree,
        &version,
        &deb_version,
        &arch,
        &dates,
        out_dir,
    );
    // Keep the staging tree only when something went wrong (to look at).
    if result.is_ok() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn stage_and_build(
    root: &Path,
    binary: &Path,
    work: &Path,
    tree: &Path,
    version: &str,
    deb_version: &str,
    arch: &str,
    dates: &Dates,
    out_dir: &Path,
) -> Result<PathBuf> {
    let doc = format!("usr/share/doc/{PACKAGE}");

    // The binary, stripped like dh_strip does (the dev build carries ~90 MB of debug info).
    let sbin = tree.join("usr/sbin/nat-agent");
    make_parent(&sbin)?;
    run(Command::new("strip")
        .args([
            "--remove-section=.comment",
            "--remove-section=.note",
            "--strip-unneeded",
            "-o",
        ])
        .arg(&sbin)
        .arg(binary))?;
    set_mode(&sbin, 0o755)?;

    copy(
        &root.join("deploy/systemd/xdp-nat.service"),
        &tree.join("lib/systemd/system/xdp-nat.service"),
    )?;
    copy(
        &root.join("deploy/sysctl/90-xdp-nat.conf"),
        &tree.join("usr/lib/sysctl.d/90-xdp-nat.conf"),
    )?;
    copy(
        &root.join("deploy/packaging/nat.toml"),
        &tree.join("etc/xdp-nat/nat.toml"),
    )?;

    let help = collect_help(&sbin)?;
    write_gz(
        &tree.join("usr/share/man/man8/nat-agent.8.gz"),
        man_page(version, &dates.day, &help).as_bytes(),
    )?;

    // Docs: Debian compresses what is larger than 4 KiB, never the copyright file.
    write_gz(
        &tree.join(&doc).join("README.md.gz"),
        &fs::read(root.join("README.md")).context("reading README.md")?,
    )?;
    write_file(
        &tree.join(&doc).join("copyright"),
        copyright(&dates.day[..4]).as_bytes(),
    )?;
    write_gz(
        &tree.join(&doc).join("changelog.Debian.gz"),
        changelog(deb_version, &dates.rfc2822).as_bytes(),
    )?;
    copy_tree(
        &root.join("deploy/examples"),
        &tree.join(&doc).join("examples"),
    )?;

    // Control area.
    let debian = tree.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    for script in ["postinst", "prerm", "postrm"] {
        let dest = debian.join(script);
        copy(&root.join("deploy/packaging").join(script), &dest)?;
        set_mode(&dest, 0o755)?;
    }
    write_file(&debian.join("conffiles"), b"/etc/xdp-nat/nat.toml\n")?;
    let files = regular_files(tree)?;
    let md5 = stdout_of(Command::new("md5sum").current_dir(tree).args(&files))?;
    write_file(&debian.join("md5sums"), md5.as_bytes())?;

    write_file(
        &work.join("debian/control"),
        format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n").as_bytes(),
    )?;
    let shlibs = stdout_of(
        Command::new("dpkg-shlibdeps")
            .current_dir(work)
            .args(["-O", "-e"])
            .arg(&sbin),
    )?;
    let lib_depends = shlibs
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends ({shlibs:?})"))?;
    let control = control_file(
        deb_version,
        arch,
        installed_size_kib(tree, &files)?,
        &format!("{lib_depends}, {INIT_SYSTEM_HELPERS}"),
    );
    write_file(&debian.join("control"), control.as_bytes())?;

    // Directories 0755 whatever the umask (dpkg-deb records the modes as they are).
    set_dir_modes(tree)?;

    let deb = out_dir.join(format!("{PACKAGE}_{deb_version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(tree)
        .arg(&deb))?;
    Ok(deb)
}

/// Dates derived from the last commit (or SOURCE_DATE_EPOCH), so rebuilding the same tree
/// gives the same man page and changelog.
struct Dates {
    /// `2026-11-22`, for the man page.
    day: String,
    /// RFC 2822, for the changelog trailer.
    rfc2822: String,
}

impl Dates {
    fn of_source(root: &Path) -> Result<Self> {
        let epoch = match env::var("SOURCE_DATE_EPOCH") {
            Ok(v) => v,
            Err(_) => Command::new("git")
                .current_dir(root)
                .args(["log", "-1", "--format=%ct"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "now".to_owned()),
        };
        let at = if epoch == "now" {
            "now".to_owned()
        } else {
            format!("@{epoch}")
        };
        let date = |fmt: &str| -> Result<String> {
            Ok(stdout_of(
                Command::new("date")
                    .env("LC_ALL", "C")
                    .args(["-u", "-d", &at, fmt]),
            )?
            .trim()
            .to_owned())
        };
        Ok(Self {
            day: date("+%Y-%m-%d")?,
            rfc2822: date("-R")?,
        })
    }
}

fn control_file(deb_version: &str, arch: &str, installed_kib: u64, depends: &str) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {deb_version}\n\
         Architecture: {arch}\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}\n\
         Section: net\n\
         Priority: optional\n\
         Description: XDP-accelerated NAT appliance (DNAT, SNAT, MASQUERADE)\n \
         The iptables nat table's job done at XDP, the kernel's earliest packet hook:\n \
         stateless and stateful DNAT (VIPs, NETMAP-style prefixes, port ranges) and\n \
         connection-tracked SNAT/MASQUERADE with per-rule counters, a sessions CLI and\n \
         Prometheus metrics.\n \
         .\n \
         Ships the nat-agent daemon, a hardened systemd unit (xdp-nat.service, not\n \
         enabled until configured), forwarding sysctls and /etc/xdp-nat/nat.toml.\n"
    )
}

/// The DEP-5 copyright file; `year` is the source's.
fn copyright(year: &str) -> String {
    format!("{COPYRIGHT_HEAD}Copyright: {year} the xdp-nat contributors\n{COPYRIGHT_LICENSE}")
}

const COPYRIGHT_HEAD: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: xdp-nat
Comment: The nat-agent binary also contains statically linked Rust crates, each under its
 own license (MIT, Apache-2.0 or compatible); see the workspace's Cargo.lock.

Files: *
";

const COPYRIGHT_LICENSE: &str = "\
License: MIT or Apache-2.0
 Dual-licensed: you may use it under either license, as declared by the workspace's
 Cargo.toml. The Apache License 2.0 is in /usr/share/common-licenses/Apache-2.0.
 .
 MIT License: Permission is hereby granted, free of charge, to any person obtaining a
 copy of this software and associated documentation files (the \"Software\"), to deal in
 the Software without restriction, including without limitation the rights to use, copy,
 modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and
 to permit persons to whom the Software is furnished to do so, subject to the following
 conditions: The above copyright notice and this permission notice shall be included in
 all copies or substantial portions of the Software. THE SOFTWARE IS PROVIDED \"AS IS\",
 WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.
";

fn changelog(deb_version: &str, date: &str) -> String {
    format!(
        "{PACKAGE} ({deb_version}) unstable; urgency=medium\n\n  \
         * Built from the xdp-nat workspace by `cargo xtask package`.\n\n \
         -- {MAINTAINER}  {date}\n"
    )
}

/// One command's help: its words after `nat-agent` (empty for the top level) and the text
/// `--help` printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelpPage {
    /// `["sessions", "list"]`.
    pub path: Vec<String>,
    /// The `--help` output.
    pub text: String,
}

/// Runs `binary [path..] --help` for the top level and every subcommand, depth first.
fn collect_help(binary: &Path) -> Result<Vec<HelpPage>> {
    let mut pages = Vec::new();
    let mut pending = vec![Vec::<String>::new()];
    while let Some(path) = pending.pop() {
        let text = stdout_of(
            Command::new(binary)
                .args(&path)
                .arg("--help")
                .env("COLUMNS", "80"),
        )?;
        // Reverse so the stack pops them in the order clap lists them.
        for sub in subcommands(&text).into_iter().rev() {
            let mut child = path.clone();
            child.push(sub);
            pending.push(child);
        }
        pages.push(HelpPage { path, text });
    }
    Ok(pages)
}

/// The subcommand names under clap's `Commands:` heading, without `help`.
pub fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim_end() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        // Entries are indented by two; deeper indentation continues a description.
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// Escapes text for a roff no-fill block: backslashes, minus signs (so options are not
/// typeset with hyphens), and control characters at the start of a line.
pub fn roff_escape(line: &str) -> String {
    let escaped = line.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

fn roff_block(out: &mut String, text: &str) {
    out.push_str(".nf\n");
    for line in text.trim_end().lines() {
        out.push_str(&roff_escape(line));
        out.push('\n');
    }
    out.push_str(".fi\n");
}

/// `nat-agent(8)`: the help of every command, framed by what `--help` cannot say (files,
/// exit status, signals, environment).
pub fn man_page(version: &str, day: &str, pages: &[HelpPage]) -> String {
    let about = pages
        .iter()
        .find(|p| p.path.is_empty())
        .and_then(|p| p.text.lines().next())
        .unwrap_or("XDP NAT appliance agent")
        .trim();
    let mut out = String::new();
    let _ = writeln!(
        out,
        ".TH NAT\\-AGENT 8 \"{day}\" \"xdp\\-nat {}\" \"System Administration\"",
        roff_escape(version)
    );
    // Ragged right: justified text spreads long paths across the line.
    out.push_str(".ad l\n");
    let _ = writeln!(out, ".SH NAME\nnat\\-agent \\- {}", roff_escape(about));
    out.push_str(".SH SYNOPSIS\n");
    let usages: Vec<String> = pages
        .iter()
        .filter(|p| !p.path.is_empty() && subcommands(&p.text).is_empty())
        .filter_map(|p| {
            p.text
                .lines()
                .find_map(|l| l.strip_prefix("Usage: "))
                .map(str::to_owned)
        })
        .collect();
    roff_block(&mut out, &usages.join("\n"));
    out.push_str(MAN_DESCRIPTION);
    out.push_str(".SH COMMANDS\n");
    for page in pages {
        let title = if page.path.is_empty() {
            "nat-agent".to_owned()
        } else {
            format!("nat-agent {}", page.path.join(" "))
        };
        let _ = writeln!(out, ".SS \"{}\"", roff_escape(&title));
        roff_block(&mut out, &page.text);
    }
    out.push_str(MAN_TRAILER);
    out
}

const MAN_DESCRIPTION: &str = r#".SH DESCRIPTION
\fBnat\-agent\fR loads the xdp\-nat XDP program, fills its maps from a TOML configuration
(DNAT and SNAT rules, connection tracking limits), attaches it to the configured
interfaces, expires sessions, and serves Prometheus metrics and a local API for
\fBnat\-agent sessions\fR. Stopping it (SIGTERM) detaches the program. Under systemd
it reports READY=1 once the program is attached and, when \fBWatchdogSec=\fR is set,
feeds the watchdog only while the task that owns the maps answers.
.PP
The packaged service \fBxdp\-nat.service\fR runs
\fBnat\-agent check\fR and then \fBnat\-agent run\fR on \fI/etc/xdp\-nat/nat.toml\fR.
The shipped file attaches to nothing and is refused until it names an interface; edit it,
then \fBsystemctl enable \-\-now xdp\-nat\fR.
"#;

const MAN_TRAILER: &str = r#".SH FILES
.TP
.I /etc/xdp\-nat/nat.toml
The configuration the service uses (format: /usr/share/doc/xdp\-nat/README.md.gz).
.TP
.I /usr/share/doc/xdp\-nat/examples/
Complete configurations for each scenario, and iptables rule sets for \fBimport\fR.
.TP
.I /run/xdp\-nat/agent.sock
The local API socket (\fB[agent] api_socket\fR), mode 0660.
.TP
.I /lib/systemd/system/xdp\-nat.service
The hardened systemd unit; change it with \fBsystemctl edit xdp\-nat\fR.
.TP
.I /usr/lib/sysctl.d/90\-xdp\-nat.conf
Forwarding on, ICMP redirects off, loose reverse\-path filtering.
.SH EXIT STATUS
.TP
.B 0
Success (\fBrun\fR: stopped by SIGTERM or SIGINT after detaching).
.TP
.B 1
A runtime failure: the program could not be loaded or attached, a listener could not be
opened, the agent could not be reached.
.TP
.B 2
The configuration was refused (one line per problem, naming the file, the rule and the
field; nothing in the kernel was touched), or the command line or a filter is invalid.
.TP
.B 3
\fBimport\fR: some input lines could not be translated (reported on stderr; the output
holds everything else).
.SH SIGNALS
SIGTERM and SIGINT make \fBrun\fR detach the program from every interface and exit.
.SH ENVIRONMENT
.TP
.B NAT_AGENT_LOG
Log filter for \fBrun\fR (default \fBinfo\fR; e.g. \fBdebug\fR). Logs go to stderr, and
from the service to the journal: \fBjournalctl \-u xdp\-nat\fR.
.SH SEE ALSO
.BR systemctl (1),
.BR journalctl (1),
.BR sysctl.d (5),
.BR iptables\-save (8)
"#;

fn make_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

fn write_file(path: &Path, contents: &[u8]) -> Result<()> {
    make_parent(path)?;
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    set_mode(path, 0o644)
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    make_parent(to)?;
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    set_mode(to, 0o644)
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else {
            copy(&entry.path(), &dest)?;
        }
    }
    Ok(())
}

/// `gzip -9n` (no name or time stamp in the header: reproducible, as Debian wants).
fn write_gz(path: &Path, contents: &[u8]) -> Result<()> {
    make_parent(path)?;
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .context("cannot run gzip")?;
    child
        .stdin
        .take()
        .context("gzip has no stdin")?
        .write_all(contents)
        .context("writing to gzip")?;
    let status = child.wait().context("waiting for gzip")?;
    ensure!(status.success(), "gzip failed ({status})");
    set_mode(path, 0o644)
}

/// Regular files under `tree`, relative, sorted, outside DEBIAN/ (what md5sums lists).
fn regular_files(tree: &Path) -> Result<Vec<String>> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if rel == "DEBIAN" {
                continue;
            }
            if entry.file_type()?.is_dir() {
                walk(&entry.path(), &rel, out)?;
            } else {
                out.push(rel);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(tree, "", &mut out)?;
    out.sort();
    Ok(out)
}

/// What dpkg-gencontrol would put in Installed-Size: KiB, each file rounded up.
fn installed_size_kib(tree: &Path, files: &[String]) -> Result<u64> {
    let mut total = 0;
    for f in files {
        let len = fs::metadata(tree.join(f))?.len();
        total += len.div_ceil(1024);
    }
    Ok(total.max(1))
}

fn set_dir_modes(dir: &Path) -> Result<()> {
    set_mode(dir, 0o755)?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            set_dir_modes(&entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOP: &str = "\
XDP NAT appliance agent: config, maps, metrics, lifecycle

Usage: nat-agent <COMMAND>

Commands:
  run       Load the config, attach the XDP program and run until SIGTERM/SIGINT
  sessions  List, delete or flush sessions of a running agent (like
            `conntrack -L/-D/-F`)
  help      Print this message or the help of the given subcommand(s)

Options:
  -h, --help     Print help
";

    #[test]
    fn subcommands_are_read_from_the_commands_heading() {
        assert_eq!(subcommands(TOP), ["run", "sessions"]);
        assert!(subcommands("Usage: nat-agent run --config <CONFIG>\n").is_empty());
    }

    #[test]
    fn roff_escaping_keeps_text_literal() {
        assert_eq!(roff_escape("--config <CONFIG>"), "\\-\\-config <CONFIG>");
        assert_eq!(roff_escape(".hidden"), "\\&.hidden");
        assert_eq!(roff_escape("'quoted"), "\\&'quoted");
        assert_eq!(roff_escape("a\\b"), "a\\eb");
    }

    #[test]
    fn man_page_has_every_command_and_a_synopsis_of_the_leaves() {
        let pages = vec![
            HelpPage {
                path: vec![],
                text: TOP.to_owned(),
            },
            HelpPage {
                path: vec!["run".into()],
                text: "Load the config\n\nUsage: nat-agent run --config <CONFIG>\n".into(),
            },
        ];
        let man = man_page("0.1.0", "2026-01-02", &pages);
        assert!(man.starts_with(".TH NAT\\-AGENT 8 \"2026-01-02\" \"xdp\\-nat 0.1.0\""));
        assert!(man.contains("nat\\-agent \\- XDP NAT appliance agent: config"));
        assert!(man.contains(".SS \"nat\\-agent run\"\n.nf\n"));
        // The synopsis lists leaves only (the top level's usage is just <COMMAND>).
        let synopsis = man
            .split(".SH SYNOPSIS\n")
            .nth(1)
            .and_then(|s| s.split(".SH").next())
            .unwrap();
        assert_eq!(
            synopsis,
            ".nf\nnat\\-agent run \\-\\-config <CONFIG>\n.fi\n"
        );
        for section in [
            "DESCRIPTION",
            "COMMANDS",
            "FILES",
            "EXIT STATUS",
            "SEE ALSO",
        ] {
            assert!(man.contains(&format!(".SH {section}\n")), "{section}");
        }
    }

    #[test]
    fn control_file_is_well_formed() {
        let c = control_file("0.1.0-1", "amd64", 1234, "libc6 (>= 2.34)");
        assert!(c.contains("\nVersion: 0.1.0-1\n"));
        assert!(c.contains("\nInstalled-Size: 1234\n"));
        // Continuation lines of the description start with one space; none is empty.
        for line in c
            .lines()
            .skip_while(|l| !l.starts_with("Description:"))
            .skip(1)
        {
            assert!(line.starts_with(' ') && line.trim() != "", "{line:?}");
        }
        assert!(c.ends_with('\n'));
    }
}
