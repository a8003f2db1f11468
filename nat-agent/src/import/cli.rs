//! `nat-agent import iptables`: input and output files, the report on stderr, exit codes.
//!
//! Exit codes: [`EXIT_TRANSLATED`] when every rule was translated (notes and warnings may
//! still be printed), [`EXIT_PARTIAL`] when some lines were reported as not translated (the
//! output holds everything else), [`EXIT_USAGE`] when the input cannot be read or an argument
//! is invalid (nothing is written), 1 when the output cannot be written.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
};

use super::{
    emit::{self, Source},
    finish, iptables, Finding, Imported, Options, Severity,
};
use crate::model::is_interface_name;

/// Every rule translated.
pub const EXIT_TRANSLATED: u8 = 0;
/// The input could not be read, or an argument is invalid; nothing was written.
pub const EXIT_USAGE: u8 = 2;
/// Some lines were not translated; the output holds everything that was.
pub const EXIT_PARTIAL: u8 = 3;
/// The output could not be written.
pub const EXIT_WRITE_FAILED: u8 = 1;

/// The arguments of `nat-agent import iptables`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IptablesArgs {
    /// `iptables-save` output; standard input when `None` or `-`.
    pub input: Option<PathBuf>,
    /// The config to write; standard output when `None` or `-`.
    pub output: Option<PathBuf>,
    /// Interfaces for `[[interfaces]]`; those the rules name when empty.
    pub interfaces: Vec<String>,
}

/// Runs the import with the given streams and returns the exit code.
pub fn run_iptables(
    args: &IptablesArgs,
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> u8 {
    // Failing to print the report leaves nothing better to do than carry on.
    let mut say = |text: String| {
        let _ = writeln!(stderr, "{text}");
    };
    if let Some(bad) = args.interfaces.iter().find(|n| !is_interface_name(n)) {
        say(format!(
            "error: --interface {bad:?} is not a valid interface name (1 to 15 printable \
             characters, no '/' or ':')"
        ));
        return EXIT_USAGE;
    }
    let input = args.input.as_deref().filter(|p| *p != Path::new("-"));
    let name = input.map_or("standard input".to_string(), |p| p.display().to_string());
    let bytes = match read_input(input, stdin) {
        Ok(bytes) => bytes,
        Err(e) => {
            say(format!("error: {name}: cannot read: {e}"));
            return EXIT_USAGE;
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut translation = iptables::read(&text);
    if std::str::from_utf8(&bytes).is_err() {
        translation.findings.push(Finding::global(
            Severity::Note,
            "the input is not valid UTF-8; invalid bytes were read as U+FFFD",
        ));
    }
    let imported = finish(
        translation,
        &Options {
            interfaces: args.interfaces.clone(),
        },
    );
    let toml = emit::to_toml(
        &imported,
        &Source {
            format: "iptables-save",
            name: name.clone(),
        },
    );
    let output = args.output.as_deref().filter(|p| *p != Path::new("-"));
    let written = match output {
        None => stdout
            .write_all(toml.as_bytes())
            .and_then(|()| stdout.flush()),
        Some(path) => write_file(path, &toml),
    };
    for finding in &imported.findings {
        say(report_line(&name, finding));
    }
    say(summary(&name, &imported, output));
    if let Err(e) = written {
        let target = output.map_or("standard output".into(), |p| p.display().to_string());
        say(format!("error: {target}: cannot write: {e}"));
        return EXIT_WRITE_FAILED;
    }
    if imported.is_partial() {
        EXIT_PARTIAL
    } else {
        EXIT_TRANSLATED
    }
}

fn read_input(path: Option<&Path>, stdin: &mut dyn Read) -> std::io::Result<Vec<u8>> {
    match path {
        Some(path) => std::fs::read(path),
        None => {
            let mut bytes = Vec::new();
            stdin.read_to_end(&mut bytes)?;
            Ok(bytes)
        }
    }
}

/// Writes next to `path` and renames, so a config in use is never seen half-written.
fn write_file(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".import-tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
}

/// `FILE:LINE: severity: message`, the way compilers report, so editors can jump to it.
pub fn report_line(name: &str, finding: &Finding) -> String {
    match finding.line {
        Some(line) => format!(
            "{name}:{line}: {}: {}",
            finding.severity.as_str(),
            finding.message
        ),
        None => format!("{name}: {}: {}", finding.severity.as_str(), finding.message),
    }
}

fn summary(name: &str, imported: &Imported, output: Option<&Path>) -> String {
    let (dnat, snat) = imported.rule_counts();
    let to = output.map_or("standard output".into(), |p| p.display().to_string());
    format!(
        "{name}: {} rules translated ({dnat} dnat, {snat} snat) into {to}; {} not translated, \
         {} warnings",
        imported.rules.len(),
        imported.count(Severity::NotTranslated),
        imported.count(Severity::Warning)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &IptablesArgs, input: &str) -> (u8, String, String) {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let code = run_iptables(args, &mut input.as_bytes(), &mut stdout, &mut stderr);
        (
            code,
            String::from_utf8(stdout).unwrap(),
            String::from_utf8(stderr).unwrap(),
        )
    }

    #[test]
    fn stdin_to_stdout_with_exit_codes() {
        let good = "*nat\n-A POSTROUTING -s 198.18.0.0/24 -o eth0 -j MASQUERADE\nCOMMIT\n";
        let (code, out, err) = run(&IptablesArgs::default(), good);
        assert_eq!(code, EXIT_TRANSLATED, "{err}");
        assert!(out.contains("masquerade = true"), "{out}");
        assert!(
            err.contains("standard input: 1 rules translated (0 dnat, 1 snat)"),
            "{err}"
        );

        let partial = format!("{good}*nat\n-A PREROUTING -j REDIRECT --to-ports 8080\nCOMMIT\n");
        let (code, out, err) = run(&IptablesArgs::default(), &partial);
        assert_eq!(code, EXIT_PARTIAL, "{err}");
        assert!(out.contains("masquerade = true"), "{out}");
        assert!(
            err.contains("standard input:5: not translated: -j REDIRECT"),
            "{err}"
        );
    }

    #[test]
    fn bad_arguments_and_unreadable_input() {
        let args = IptablesArgs {
            interfaces: vec!["a/b".into()],
            ..IptablesArgs::default()
        };
        let (code, out, err) = run(&args, "");
        assert_eq!((code, out.as_str()), (EXIT_USAGE, ""));
        assert!(err.contains("--interface \"a/b\""), "{err}");

        let args = IptablesArgs {
            input: Some("/nonexistent/xdpnat-import".into()),
            ..IptablesArgs::default()
        };
        let (code, out, err) = run(&args, "");
        assert_eq!((code, out.as_str()), (EXIT_USAGE, ""));
        assert!(
            err.starts_with("error: /nonexistent/xdpnat-import: cannot read:"),
            "{err}"
        );
    }

    #[test]
    fn invalid_utf8_is_read_lossily_with_a_note() {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let input: &[u8] =
            b"-A POSTROUTING -s 198.18.0.0/24 -o eth0 -m comment --comment \"\xff\" -j MASQUERADE\n";
        let code = run_iptables(
            &IptablesArgs::default(),
            &mut &input[..],
            &mut stdout,
            &mut stderr,
        );
        let err = String::from_utf8_lossy(&stderr);
        assert_eq!(code, EXIT_TRANSLATED, "{err}");
        assert!(err.contains("not valid UTF-8"), "{err}");
    }
}
