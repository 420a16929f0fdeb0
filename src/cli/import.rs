//! `icmp import`: load business definitions (business, stages, templates) from TOML files.

use std::path::PathBuf;

use anyhow::Result;

use icmp::startup::Operator;

#[derive(Debug, clap::Args)]
pub(super) struct Args {
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

pub(super) async fn run(operator: &Operator, args: Args) -> Result<()> {
    let cache = match operator.cache().await {
        Ok(cache) => Some(cache),
        Err(e) => {
            eprintln!("warning: redis unreachable ({e}); cached definitions expire by TTL");
            None
        }
    };
    let reports =
        icmp::business::import_files(operator.store().await?, cache.as_ref(), &args.files).await?;
    for r in reports {
        println!("business {}:", r.business_id);
        for (name, change, version) in r.templates {
            println!("  template {name}: {change:?} (version {version})");
        }
        println!("  stages: {}", r.stage_ids.len());
    }
    Ok(())
}
