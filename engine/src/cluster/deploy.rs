//! Deployments reach every node: models, rules and routes put in force on one node are
//! put in force on all.
//!
//! The cluster's desired state is three entries of the key-value bucket
//! `PAYSWITCH_DEPLOY` — `models` (the champion's and the challengers' ids), `rules` (the
//! rules text), `routes` (the routing rules) — and the model files themselves, by id, in
//! the object store `PAYSWITCH_MODELS`. Each node:
//!
//! - puts in force what the bucket holds, at start (over its own files) and whenever an
//!   entry changes; a deployment that does not load here (a model over this node's
//!   budget, rules naming an unknown variable, routes naming an acquirer this node does
//!   not have) is refused with an error in the log and the previous one stays;
//! - publishes its own state when it changes here — a model deployed or promoted through
//!   the admin API or the models directory, the rules file edited, the routes reloaded —
//!   checking every second, so every way of deploying on one node reaches the others.
//!
//! Each node remembers the last state it published or put in force, so a change applied
//! from the bucket is not published back. Two nodes deploying at once: the bucket keeps
//! the later, and both end with it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use async_nats::jetstream::{self, kv, object_store};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use super::ClusterConfig;
use crate::routing::{RouteConfig, Router};
use crate::scoring::Scoring;
use payswitch_models::model::Model;

/// The bucket of the desired state.
pub const DEPLOY_BUCKET: &str = "PAYSWITCH_DEPLOY";

/// The object store of model files.
pub const MODELS_STORE: &str = "PAYSWITCH_MODELS";

/// Largest model file taken from the store: the admin API's own bound on a deploy.
const MAX_MODEL_BYTES: usize = 64 * 1024 * 1024;

/// How often a node compares its state with what it last published.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The models in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelsState {
    /// The champion's id.
    pub champion: Option<String>,
    /// The challengers' ids, in deployment order.
    pub challengers: Vec<String>,
}

/// The desired state as the bucket holds it: what, and which node put it there.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Deployed<T> {
    state: T,
    by: String,
    at_ms: i64,
}

/// What a node deploys: its scoring (models, rules) and routing table.
pub struct Deployer {
    kv: kv::Store,
    objects: object_store::ObjectStore,
    node: String,
    scoring: Arc<Scoring>,
    router: Arc<ArcSwap<Router>>,
    acquirers: Vec<String>,
    /// The last state published or put in force, per entry (as JSON).
    last: std::sync::Mutex<std::collections::HashMap<&'static str, serde_json::Value>>,
}

impl std::fmt::Debug for Deployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployer")
            .field("node", &self.node)
            .finish()
    }
}

impl Deployer {
    /// Opens (or creates) the bucket and the object store.
    pub async fn open(
        context: &jetstream::Context,
        config: &ClusterConfig,
        scoring: Arc<Scoring>,
        router: Arc<ArcSwap<Router>>,
        acquirers: Vec<String>,
    ) -> anyhow::Result<Deployer> {
        let kv =
            super::lease::bucket(context, DEPLOY_BUCKET, config.replicas, Duration::ZERO).await?;
        let objects = match context.get_object_store(MODELS_STORE).await {
            Ok(store) => store,
            Err(_) => match context
                .create_object_store(object_store::Config {
                    bucket: MODELS_STORE.into(),
                    num_replicas: config.replicas,
                    ..Default::default()
                })
                .await
            {
                Ok(store) => store,
                Err(_) => context
                    .get_object_store(MODELS_STORE)
                    .await
                    .context("the model store")?,
            },
        };
        Ok(Deployer {
            kv,
            objects,
            node: config.node.clone(),
            scoring,
            router,
            acquirers,
            last: Default::default(),
        })
    }

    fn models_here(&self) -> ModelsState {
        ModelsState {
            champion: self.scoring.champion().map(|m| m.id().to_string()),
            challengers: self
                .scoring
                .challengers()
                .iter()
                .map(|c| c.model.id().to_string())
                .collect(),
        }
    }

    fn routes_here(&self) -> Vec<RouteConfig> {
        self.router.load().routes().to_vec()
    }

    fn remember(&self, entry: &'static str, state: serde_json::Value) {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(entry, state);
    }

    fn remembered(&self, entry: &'static str) -> Option<serde_json::Value> {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(entry)
            .cloned()
    }

    /// The state here of `entry`, as JSON.
    fn here(&self, entry: &'static str) -> serde_json::Value {
        match entry {
            "models" => serde_json::to_value(self.models_here()),
            "rules" => serde_json::to_value(self.scoring.rules().text().as_str()),
            _ => serde_json::to_value(self.routes_here()),
        }
        .unwrap_or_default()
    }

    /// Publishes `entry` if it changed here since it was last published or put in force.
    async fn publish_if_changed(&self, entry: &'static str) -> anyhow::Result<()> {
        let here = self.here(entry);
        if self.remembered(entry).as_ref() == Some(&here) {
            return Ok(());
        }
        if entry == "models" {
            self.upload_models().await?;
        }
        let deployed = Deployed {
            state: here.clone(),
            by: self.node.clone(),
            at_ms: crate::clock::now().unix_ms(),
        };
        self.kv
            .put(entry, serde_json::to_vec(&deployed)?.into())
            .await?;
        tracing::info!(entry, "deployment published to the cluster");
        self.remember(entry, here);
        Ok(())
    }

    /// Puts each model in force here into the object store, if it is not there yet.
    async fn upload_models(&self) -> anyhow::Result<()> {
        let mut models: Vec<Arc<Model>> = self.scoring.champion().into_iter().collect();
        models.extend(
            self.scoring
                .challengers()
                .iter()
                .map(|c| Arc::clone(&c.model)),
        );
        for model in models {
            if self.objects.info(model.id()).await.is_ok() {
                continue;
            }
            let bytes = model.to_bytes();
            self.objects
                .put(model.id(), &mut bytes.as_slice())
                .await
                .with_context(|| format!("storing model {}", model.id()))?;
        }
        Ok(())
    }

    async fn model(&self, id: &str) -> anyhow::Result<Arc<Model>> {
        let here = self
            .scoring
            .champion()
            .filter(|m| m.id() == id)
            .or_else(|| {
                self.scoring
                    .challengers()
                    .iter()
                    .find(|c| c.model.id() == id)
                    .map(|c| Arc::clone(&c.model))
            });
        if let Some(model) = here {
            return Ok(model);
        }
        let mut object = self
            .objects
            .get(id)
            .await
            .with_context(|| format!("model {id} from {MODELS_STORE}"))?;
        let mut bytes = Vec::new();
        (&mut object)
            .take(MAX_MODEL_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .await?;
        anyhow::ensure!(
            bytes.len() <= MAX_MODEL_BYTES,
            "model {id} is over {MAX_MODEL_BYTES} bytes"
        );
        let model = tokio::task::spawn_blocking(move || Model::load(&bytes)).await??;
        anyhow::ensure!(
            model.id() == id,
            "the object {id} holds model {}",
            model.id()
        );
        Ok(Arc::new(model))
    }

    /// Puts `entry`'s desired `state` in force here.
    async fn apply(&self, entry: &str, state: &serde_json::Value) -> anyhow::Result<()> {
        match entry {
            "models" => {
                let desired: ModelsState = serde_json::from_value(state.clone())?;
                // Load everything first: a model that does not load changes nothing.
                let champion = match &desired.champion {
                    Some(id) => Some(self.model(id).await?),
                    None => None,
                };
                let mut challengers = Vec::new();
                for id in &desired.challengers {
                    challengers.push(self.model(id).await?);
                }
                for model in &challengers {
                    self.scoring.admit(model).map_err(anyhow::Error::msg)?;
                }
                if let Some(champion) = champion {
                    if self.scoring.champion().map(|m| m.id().to_string()) != desired.champion {
                        self.scoring
                            .set_champion(champion)
                            .map_err(anyhow::Error::msg)?;
                    }
                }
                self.scoring.retain_challengers(&desired.challengers);
                let present = self.models_here().challengers;
                for model in challengers {
                    if !present.iter().any(|id| id == model.id()) {
                        self.scoring
                            .add_challenger(model)
                            .map_err(anyhow::Error::msg)?;
                    }
                }
                self.remember("models", serde_json::to_value(self.models_here())?);
            }
            "rules" => {
                let text: String = serde_json::from_value(state.clone())?;
                if *self.scoring.rules().text() != text {
                    let count = self.scoring.rules().apply_text(&text)?;
                    tracing::info!(rules = count, "rules deployed from the cluster");
                }
                self.remember("rules", state.clone());
            }
            "routes" => {
                let routes: Vec<RouteConfig> = serde_json::from_value(state.clone())?;
                let names: Vec<&str> = self.acquirers.iter().map(String::as_str).collect();
                let router = Router::new(&names, &routes).map_err(anyhow::Error::msg)?;
                self.router.store(Arc::new(router));
                tracing::info!(routes = routes.len(), "routes deployed from the cluster");
                self.remember("routes", state.clone());
            }
            _ => {}
        }
        Ok(())
    }

    /// At start: what the cluster holds is put in force here (a node that was down
    /// catches up); an entry the cluster does not hold yet is published from here.
    pub async fn start(&self) -> anyhow::Result<()> {
        for entry in ["models", "rules", "routes"] {
            match self.kv.entry(entry).await? {
                Some(e) if e.operation == kv::Operation::Put => {
                    let deployed: Deployed<serde_json::Value> = serde_json::from_slice(&e.value)?;
                    if let Err(err) = self.apply(entry, &deployed.state).await {
                        tracing::error!(entry, by = %deployed.by, error = %err, "the cluster's deployment does not load here; this node keeps its own");
                        // Not published back: only a change made here is.
                        self.remember(entry, self.here(entry));
                    }
                }
                _ => self.publish_if_changed(entry).await?,
            }
        }
        Ok(())
    }

    /// Follows the bucket and publishes local changes, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let watched = tokio::select! {
                _ = shutdown.cancelled() => return,
                watched = self.kv.watch_all() => watched,
            };
            let mut entries = match watched {
                Ok(entries) => entries,
                Err(e) => {
                    tracing::warn!(error = %e, "watching deployments failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(CHECK_EVERY) => continue,
                    }
                }
            };
            let mut tick = tokio::time::interval(CHECK_EVERY);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    entry = entries.next() => {
                        let Some(Ok(entry)) = entry else { break };
                        if entry.operation != kv::Operation::Put {
                            continue;
                        }
                        let Ok(deployed) = serde_json::from_slice::<Deployed<serde_json::Value>>(&entry.value) else {
                            continue;
                        };
                        let name: &'static str = match entry.key.as_str() {
                            "models" => "models",
                            "rules" => "rules",
                            "routes" => "routes",
                            _ => continue,
                        };
                        if self.remembered(name).as_ref() == Some(&deployed.state) {
                            continue;
                        }
                        match self.apply(name, &deployed.state).await {
                            Ok(()) => tracing::info!(entry = name, by = %deployed.by, "deployment put in force from the cluster"),
                            Err(e) => {
                                tracing::error!(entry = name, by = %deployed.by, error = %e, "a deployment from the cluster does not load here; the previous one stays");
                                // Not published back: only a change made here is.
                                self.remember(name, self.here(name));
                            }
                        }
                    }
                    _ = tick.tick() => {
                        for entry in ["models", "rules", "routes"] {
                            if let Err(e) = self.publish_if_changed(entry).await {
                                tracing::warn!(entry, error = %e, "publishing a deployment failed; retrying");
                            }
                        }
                    }
                }
            }
        }
    }
}
