//! `nat-agent`: the XDP NAT appliance's daemon and CLI.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use nat_agent::{
    client::{
        self,
        rules::{rules_of_file, ChangeOptions, OneRule},
        ClientError, RulesCommand, SessionsCommand,
    },
    daemon, import, load_config, load_config_file,
    model::DEFAULT_API_SOCKET,
    ruleset::RuleKind,
    sessions::SessionFilter,
};

/// XDP-accelerated NAT appliance agent.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the config, attach the XDP program and run until SIGTERM/SIGINT.
    Run {
        /// The TOML config file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a config file without touching the kernel.
    Check {
        /// The TOML config file.
        #[arg(short, long)]
        config: PathBuf,
        /// Print the result as JSON (on stdout, also for a refused config).
        #[arg(long)]
        json: bool,
    },
    /// List, delete or flush sessions of a running agent (like `conntrack -L/-D/-F`).
    Sessions {
        #[command(subcommand)]
        action: SessionsAction,
    },
    /// Show or change the rules of a running agent (each change is one transaction).
    Rules {
        #[command(subcommand)]
        action: RulesAction,
    },
    /// Print the local API's OpenAPI document (JSON).
    Openapi,
    /// Pinned state ([agent] state_dir): detach the program, or remove everything.
    State {
        #[command(subcommand)]
        action: StateAction,
    },
    /// Show a running agent's status.
    Status {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Translate another tool's NAT rules into a config file.
    Import {
        #[command(subcommand)]
        from: ImportFrom,
    },
}

#[derive(Subcommand)]
enum ImportFrom {
    /// Translate `iptables-save` output (its *nat table) into a config.
    ///
    /// Lines that cannot be translated are reported on stderr with their line number and the
    /// reason, and the exit code is then 3 (the output holds everything else); 2 when the
    /// input cannot be read.
    Iptables {
        /// The iptables-save output; `-` for standard input.
        #[arg(long, default_value = "-")]
        input: PathBuf,
        /// Where to write the config; standard output when absent or `-`.
        #[arg(long)]
        output: Option<PathBuf>,
        /// An interface to attach to (repeat for several); default: those the rules name
        /// with -i and -o.
        #[arg(long = "interface", value_name = "NAME")]
        interfaces: Vec<String>,
    },
}

#[derive(Subcommand)]
enum RulesAction {
    /// List the rules in force with their generation.
    List {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Add the one rule ([[dnat]] or [[snat]] entry) of a TOML file ("-": stdin).
    Add {
        file: PathBuf,
        /// Index among the rules of its table (0: first, highest priority); default: last.
        #[arg(long)]
        position: Option<usize>,
        #[command(flatten)]
        change: ChangeArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Replace the rule NAME with the one rule of a TOML file ("-": stdin), keeping its place.
    Change {
        name: String,
        file: PathBuf,
        #[command(flatten)]
        change: ChangeArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Delete a rule (its sessions keep their translation until they end or are deleted).
    #[command(alias = "delete")]
    Del {
        /// dnat or snat.
        kind: String,
        name: String,
        #[command(flatten)]
        change: ChangeArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Replace every rule with the [[dnat]] and [[snat]] rules of a config file.
    Replace {
        file: PathBuf,
        #[command(flatten)]
        change: ChangeArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Show what replacing the rules with those of a config file would change.
    Diff {
        file: PathBuf,
        #[command(flatten)]
        common: CommonArgs,
    },
}

#[derive(Subcommand)]
enum StateAction {
    /// Detach the pinned program from every interface; the pinned maps (sessions, counters)
    /// stay for the next start.
    Detach {
        /// The [agent] state_dir.
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Detach and remove all pinned state of every schema version (sessions are lost): the
    /// way out when an agent refuses pinned state it cannot use.
    Clear {
        /// The [agent] state_dir.
        #[arg(long)]
        state_dir: PathBuf,
    },
}

#[derive(Args)]
struct ChangeArgs {
    /// Only report what would change.
    #[arg(long)]
    dry_run: bool,
    /// Refuse unless the rules in force are at this generation (see `rules list`).
    #[arg(long)]
    generation: Option<u64>,
}

impl ChangeArgs {
    fn options(&self) -> ChangeOptions {
        ChangeOptions {
            dry_run: self.dry_run,
            generation: self.generation,
        }
    }
}

#[derive(Subcommand)]
enum SessionsAction {
    /// List sessions (all, or those matching every filter given).
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Show at most this many (the agent's default is 10000).
        #[arg(long)]
        limit: Option<usize>,
        /// Skip this many matching sessions (the previous page's next offset).
        #[arg(long)]
        offset: Option<usize>,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Delete the sessions matching every filter given (at least one).
    #[command(alias = "del")]
    Delete {
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Delete every session.
    Flush {
        #[command(flatten)]
        common: CommonArgs,
    },
}

#[derive(Args)]
struct CommonArgs {
    /// The agent's API socket (`[agent] api_socket`).
    #[arg(long, default_value = DEFAULT_API_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct FilterArgs {
    /// tcp, udp or icmp.
    #[arg(long)]
    protocol: Option<String>,
    /// An address of either direction's tuple (inside, remote or external).
    #[arg(long)]
    address: Option<String>,
    /// A port (or ICMP echo id) of either direction's tuple.
    #[arg(long)]
    port: Option<String>,
    /// The name of the DNAT or SNAT rule that made the session.
    #[arg(long)]
    rule: Option<String>,
}

impl FilterArgs {
    /// Validates the filters with the same parser the agent uses, so mistakes are caught
    /// before connecting and read the same.
    fn parse(&self) -> Result<SessionFilter, String> {
        let pairs: Vec<(String, String)> = [
            ("protocol", &self.protocol),
            ("address", &self.address),
            ("port", &self.port),
            ("rule", &self.rule),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k.to_string(), v)))
        .collect();
        SessionFilter::from_pairs(&pairs, false).map(|q| q.filter)
    }
}

/// Exit code for a config that does not validate (nothing was changed), and for bad
/// command-line arguments.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, json } => check(&config, json),
        Command::Run { config } => {
            init_tracing();
            let loaded = match load_config_file(&config) {
                Ok(loaded) => loaded,
                Err(e) => return config_error(&e.0),
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: starting the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(daemon::run(&config, loaded)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Sessions { action } => sessions(action),
        Command::Rules { action } => rules(action),
        Command::State { action } => state(action),
        Command::Openapi => match nat_agent::api::openapi_document().to_pretty_json() {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: encoding the OpenAPI document: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Status { common } => {
            let socket = common.socket.clone();
            answer(async move { client::run_status(&socket, common.json).await })
        }
        Command::Import {
            from:
                ImportFrom::Iptables {
                    input,
                    output,
                    interfaces,
                },
        } => ExitCode::from(import::cli::run_iptables(
            &import::cli::IptablesArgs {
                input: Some(input),
                output,
                interfaces,
            },
            &mut std::io::stdin().lock(),
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        )),
    }
}

fn sessions(action: SessionsAction) -> ExitCode {
    let (command, common) = match action {
        SessionsAction::List {
            filter,
            limit,
            offset,
            common,
        } => match filter.parse() {
            Ok(filter) => (
                SessionsCommand::List {
                    filter,
                    limit,
                    offset,
                },
                common,
            ),
            Err(e) => return usage_error(&e),
        },
        SessionsAction::Delete { filter, common } => match filter.parse() {
            Ok(filter) if filter.is_empty() => {
                return usage_error(
                    "delete needs at least one of --protocol, --address, --port, --rule \
                     (`sessions flush` deletes every session)",
                )
            }
            Ok(filter) => (SessionsCommand::Delete { filter }, common),
            Err(e) => return usage_error(&e),
        },
        SessionsAction::Flush { common } => (SessionsCommand::Flush, common),
    };
    answer(async move { client::run(&common.socket, &command, common.json).await })
}

/// `check`: validate and compile, touch nothing; the effective values, defaults included, so
/// an operator (and the tests) can see what the RFC floors and the file add up to.
fn check(config: &std::path::Path, json: bool) -> ExitCode {
    let (model, compiled) = match load_config(config) {
        Ok(loaded) => loaded,
        Err(e) if json => {
            let problems: Vec<&str> = e.0.lines().collect();
            let answer = serde_json::json!({
                "file": config.display().to_string(),
                "ok": false,
                "problems": problems,
            });
            println!("{answer:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => return config_error(&e.0),
    };
    let ct = &model.conntrack;
    let t = &ct.timeouts;
    if json {
        let answer = serde_json::json!({
            "file": config.display().to_string(),
            "ok": true,
            "dnat_rules": model.dnat.len(),
            "snat_rules": model.snat.len(),
            "interfaces": model.interfaces.len(),
            "stateful": compiled.stateful.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            "conntrack": {
                "max_sessions": ct.max_sessions,
                "udp_timeout": t.udp.as_secs(),
                "tcp_established_timeout": t.tcp_established.as_secs(),
                "tcp_transitory_timeout": t.tcp_transitory.as_secs(),
                "tcp_closed_timeout": t.tcp_closed.as_secs(),
                "icmp_timeout": t.icmp.as_secs(),
                "gc_interval": ct.gc_interval.as_secs_f64(),
            },
        });
        println!("{answer:#}");
        return ExitCode::SUCCESS;
    }
    println!(
        "{}: OK ({} dnat rules, {} snat rules, {} interfaces)",
        config.display(),
        model.dnat.len(),
        model.snat.len(),
        model.interfaces.len()
    );
    for rule in &compiled.stateful {
        println!("{}: {rule}", config.display());
    }
    println!(
        "{}: conntrack max_sessions={} udp_timeout={}s tcp_established_timeout={}s \
         tcp_transitory_timeout={}s tcp_closed_timeout={}s icmp_timeout={}s gc_interval={}s",
        config.display(),
        ct.max_sessions,
        t.udp.as_secs(),
        t.tcp_established.as_secs(),
        t.tcp_transitory.as_secs(),
        t.tcp_closed.as_secs(),
        t.icmp.as_secs(),
        ct.gc_interval.as_secs_f64()
    );
    ExitCode::SUCCESS
}

fn state(action: StateAction) -> ExitCode {
    use nat_agent::dataplane::pinned;
    let result = match action {
        StateAction::Detach { state_dir } => pinned::detach(&state_dir).map(|detached| {
            if detached.is_empty() {
                println!("nothing attached under {}", state_dir.display());
            }
            for iface in detached {
                println!("detached from {iface}");
            }
        }),
        StateAction::Clear { state_dir } => pinned::clear(&state_dir).map(|cleared| {
            for iface in &cleared.detached {
                println!("detached from {iface}");
            }
            println!(
                "removed {} pinned objects under {}",
                cleared.removed,
                state_dir.display()
            );
        }),
    };
    // Nothing translates any more: the VIP announcements (if any) go too.
    let withdrawn = result.and_then(|()| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(nat_agent::announce::withdraw_all()))
    });
    match withdrawn {
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => {
            println!("withdrew {n} VIP routes");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads a file named on the command line ("-": stdin).
fn read_input(path: &std::path::Path) -> Result<(String, String), String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| format!("reading stdin: {e}"))?;
        return Ok(("<stdin>".into(), text));
    }
    let name = path.display().to_string();
    std::fs::read_to_string(path)
        .map(|text| (name.clone(), text))
        .map_err(|e| format!("{name}: cannot read: {e}"))
}

fn rules(action: RulesAction) -> ExitCode {
    let one_rule = |file: &std::path::Path| {
        read_input(file).and_then(|(name, text)| OneRule::parse(&name, &text))
    };
    let all_rules = |file: &std::path::Path| {
        read_input(file).and_then(|(name, text)| rules_of_file(&name, &text))
    };
    let parsed = match action {
        RulesAction::List { common } => Ok((RulesCommand::List, common)),
        RulesAction::Add {
            file,
            position,
            change,
            common,
        } => one_rule(&file).map(|rule| {
            (
                RulesCommand::Add {
                    rule,
                    position,
                    options: change.options(),
                },
                common,
            )
        }),
        RulesAction::Change {
            name,
            file,
            change,
            common,
        } => one_rule(&file).map(|rule| {
            (
                RulesCommand::Change {
                    name,
                    rule,
                    options: change.options(),
                },
                common,
            )
        }),
        RulesAction::Del {
            kind,
            name,
            change,
            common,
        } => match RuleKind::parse(&kind) {
            Some(kind) => Ok((
                RulesCommand::Delete {
                    kind,
                    name,
                    options: change.options(),
                },
                common,
            )),
            None => Err(format!("{kind:?} is not a rule table (dnat or snat)")),
        },
        RulesAction::Replace {
            file,
            change,
            common,
        } => all_rules(&file).map(|rules| {
            (
                RulesCommand::Replace {
                    rules,
                    options: change.options(),
                },
                common,
            )
        }),
        RulesAction::Diff { file, common } => {
            all_rules(&file).map(|rules| (RulesCommand::Diff { rules }, common))
        }
    };
    let (command, common) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => return config_error(&e),
    };
    answer(async move { client::run_rules(&common.socket, &command, common.json).await })
}

/// Runs one client request and prints its answer. A refusal for a bad request (400) exits
/// with the config-error status, like an invalid config file.
fn answer(request: impl std::future::Future<Output = Result<String, ClientError>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(request) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e @ ClientError::Refused { status: 400, .. }) => config_error(&e.to_string()),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_CONFIG)
}

fn config_error(message: &str) -> ExitCode {
    for line in message.lines() {
        eprintln!("error: {line}");
    }
    ExitCode::from(EXIT_CONFIG)
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("NAT_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // `init` also bridges the `log` crate (aya-log's output) into tracing.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
