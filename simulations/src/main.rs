//! `syncsim`: runs syncnode cluster scenarios in simulated time.
//!
//! - `syncsim run SCENARIO --seed S` runs one scenario (a TOML file, or the
//!   name of one in `simulations/scenarios/`) and replays it exactly;
//! - `syncsim check [--seeds a,b,…]` runs every shipped scenario on fixed
//!   seeds and fails on any violation or missed goal (what CI runs);
//! - `syncsim explore --seeds N` runs N random fault schedules and prints
//!   each failing seed with the command that replays it.

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use syncnode_sim::report::{self, Report};
use syncnode_sim::scenario::Scenario;
use syncnode_sim::{explore, plot};

#[derive(Parser)]
#[command(name = "syncsim", version, about = "Deterministic simulator for syncnode clusters")]
struct Cli {
    /// Logs the nodes' decisions (a tracing filter such as `info` or
    /// `syncnode_protocol=debug`), stamped with the simulated time.
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one scenario.
    Run {
        /// A scenario file, or the name of a shipped scenario.
        scenario: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Writes the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Writes SVG plots into this directory.
        #[arg(long)]
        plots: Option<PathBuf>,
    },
    /// Runs every shipped scenario on each seed; fails on a violation or a missed goal.
    Check {
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        seeds: Vec<u64>,
        /// Only scenarios whose name contains this.
        #[arg(long)]
        only: Option<String>,
    },
    /// Runs random fault schedules; prints failing seeds.
    Explore {
        /// How many seeds, from `--from`.
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Replays one schedule (as printed for a failing seed).
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

fn load(name: &str) -> anyhow::Result<Scenario> {
    let path = if Path::new(name).exists() {
        PathBuf::from(name)
    } else {
        scenarios_dir().join(format!("{name}.toml"))
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e} (a file, or one of: {})", path.display(), shipped().join(", ")))?;
    Scenario::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn shipped() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(scenarios_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".toml").map(str::to_string))
        .collect();
    names.sort();
    names
}

/// Runs with a progress bar when the run takes more than a second.
fn run_shown(sc: &Scenario, seed: u64) -> Report {
    let started = Instant::now();
    let bar = ProgressBar::hidden();
    bar.set_length(1000);
    bar.set_style(ProgressStyle::with_template("{msg} [{bar:40}] {percent}%").expect("template"));
    bar.set_message(format!("{} seed {seed}", sc.name));
    let r = report::run(sc, seed, |f| {
        if started.elapsed().as_secs_f64() > 1.0 && bar.is_hidden() {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        bar.set_position((f * 1000.0) as u64);
    });
    bar.finish_and_clear();
    r
}

/// Misses of the scenario's goals.
fn goal_misses(sc: &Scenario, r: &Report) -> Vec<String> {
    let g = &sc.goals;
    let mut out = Vec::new();
    let mut want = |name: &str, got: f64, max: Option<f64>| {
        if let Some(m) = max
            && got > m
        {
            out.push(format!("{name} {got:.1} > goal {m}"));
        }
    };
    want("heal_to_equal_p99_ms", r.heal_to_equal_ms.p99, g.heal_to_equal_p99_ms);
    want("visibility_p50_ms", r.visibility_ms.p50, g.visibility_p50_ms);
    want("visibility_max_ms", r.visibility_ms.max, g.visibility_max_ms);
    want("messages_per_write", r.messages_per_write, g.messages_per_write);
    want("visibility_p99_ms", r.visibility_ms.p99, g.visibility_p99_ms);
    want(
        "wan_bytes_per_delta_byte",
        r.wan_bytes_per_delta_byte,
        g.wan_bytes_per_delta_byte,
    );
    want(
        "recovery_wan_bytes_per_delta_byte",
        r.recovery_wan_bytes_per_delta_byte,
        g.recovery_wan_bytes_per_delta_byte,
    );
    out
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("syncsim: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<bool> {
    let cli = Cli::parse();
    if let Some(filter) = &cli.log {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_new(filter)?)
            .with_timer(syncnode_sim::sim::SimTime)
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .init();
    }
    match cli.command {
        Command::Run {
            scenario,
            seed,
            json,
            plots,
        } => {
            let sc = load(&scenario)?;
            let r = run_shown(&sc, seed);
            print!("{}", r.summary());
            for m in goal_misses(&sc, &r) {
                println!("  GOAL MISSED {m}");
            }
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&r)?)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            }
            if let Some(dir) = plots {
                plot::write_all(&r, &dir)?;
            }
            Ok(!r.failed())
        }
        Command::Check { seeds, only } => {
            let mut ok = true;
            let started = Instant::now();
            for name in shipped() {
                if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
                    continue;
                }
                let sc = load(&name)?;
                for &seed in &seeds {
                    let r = run_shown(&sc, seed);
                    print!("{}", r.summary());
                    let misses = goal_misses(&sc, &r);
                    for m in &misses {
                        println!("  GOAL MISSED {m}");
                    }
                    if r.failed() || !misses.is_empty() {
                        ok = false;
                        println!("FAILED: replay with `syncsim run {name} --seed {seed}`");
                    }
                }
            }
            println!("checked in {:.1} s", started.elapsed().as_secs_f64());
            Ok(ok)
        }
        Command::Explore { seeds, from, seed } => {
            let range: Vec<u64> = match seed {
                Some(s) => vec![s],
                None => (from..from + seeds).collect(),
            };
            let started = Instant::now();
            let mut failing = Vec::new();
            for s in &range {
                let sc = explore::scenario(*s);
                let r = run_shown(&sc, *s);
                if seed.is_some() {
                    print!("{}", r.summary());
                    for f in &sc.faults {
                        println!("  fault at {:.2} s: {:?}", f.at_s, f.kind);
                    }
                }
                if r.failed() {
                    println!(
                        "seed {s}: {} violation(s), converged {}: replay with `syncsim explore --seed {s}`",
                        r.violations.len(),
                        r.converged
                    );
                    failing.push(*s);
                }
            }
            let took = started.elapsed().as_secs_f64();
            println!(
                "bench=sim_explore metric=seconds_per_{}_seeds value={took:.1} unit=s\nbench=sim_explore metric=failing_seeds value={} unit=seeds",
                range.len(),
                failing.len()
            );
            Ok(failing.is_empty())
        }
    }
}
