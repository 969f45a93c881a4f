//! `payswitch cluster status`: the cluster as the NATS servers hold it — every node's
//! lease, the journal stream's state — read with a node's configuration file.

use std::path::PathBuf;

use anyhow::Context;

/// `payswitch cluster …`.
#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    /// Every node's lease (held or taken over, generation, age), the journal stream's
    /// messages, leader and replicas.
    Status {
        /// A node's configuration file: its `[cluster]` says where the servers are.
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `cluster` subcommand.
pub fn run(command: ClusterCommand) -> anyhow::Result<()> {
    let ClusterCommand::Status { config, json } = command;
    let config = payswitch::config::Config::read_file(&config)?;
    let cluster = config
        .cluster
        .context("the configuration has no [cluster]")?;
    cluster.check().map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (nodes, stream) = runtime.block_on(async {
        let client = payswitch::cluster::connect(&cluster).await?;
        let context = async_nats::jetstream::new(client);
        let leases = context
            .get_key_value(payswitch::cluster::lease::LEASE_BUCKET)
            .await
            .context("the lease bucket (has a node started?)")?;
        let nodes = payswitch::cluster::view::leases(&leases).await?;
        let stream = payswitch::cluster::view::stream_state(&context, &cluster.stream).await?;
        anyhow::Ok((nodes, stream))
    })?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "nodes": nodes, "stream": stream }))?
        );
        return Ok(());
    }
    println!(
        "{:<16} {:<12} {:>11} {:>9}  taken over by",
        "node", "lease", "generation", "age ms"
    );
    for n in &nodes {
        println!(
            "{:<16} {:<12} {:>11} {:>9}  {}",
            n.node,
            n.state,
            n.generation,
            n.age_ms,
            n.taken_over_by.as_deref().unwrap_or("")
        );
    }
    println!(
        "stream {}: {} messages, {} bytes, sequence {}..={}, {} replicas ({} current besides the leader{})",
        cluster.stream,
        stream.messages,
        stream.bytes,
        stream.first_seq,
        stream.last_seq,
        stream.replicas,
        stream.replicas_current,
        stream
            .leader
            .as_deref()
            .map(|l| format!(", leader {l}"))
            .unwrap_or_default()
    );
    Ok(())
}
