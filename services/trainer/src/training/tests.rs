//! The training loop end to end on the fixture model, on the CPU.

use super::*;
use crate::error::{classify, Failure};
use crate::fixture::write_fixture;
use crate::model::weights::read_safetensors;
use crate::training::checkpoint::StoredCheckpoints;
use crate::training::seeds::torch_rng_turn;
use loraforge_storage::Store;
use std::sync::atomic::Ordering;
use tch::{Kind, Tensor};

#[derive(Default)]
struct Recorder(Vec<EventPayload>);

impl Reporter for Recorder {
    fn report(&mut self, event: EventPayload) {
        self.0.push(event);
    }
}

impl Recorder {
    fn progress_steps(&self) -> Vec<u32> {
        self.0
            .iter()
            .filter_map(|e| {
                if let EventPayload::Progress { step, .. } = e {
                    Some(*step)
                } else {
                    None
                }
            })
            .collect()
    }
}

fn fixture() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let _turn = torch_rng_turn();
    write_fixture(root.path(), 0).unwrap();
    root
}

fn job(root: &Path, dataset: &str, method: &str, training: &str) -> JobSpec {
    let body = format!(
        r#"{{"adapter_name":"demo","base_model":"file://{root}/model","dataset":{dataset},"method":{method},"training":{training}}}"#,
        root = root.display()
    );
    JobSpec::parse(body.as_bytes()).unwrap()
}

fn fixture_job(root: &Path, method: &str, training: &str) -> JobSpec {
    let dataset = format!(
        r#"{{"train":"file://{}/data/train.jsonl"}}"#,
        root.display()
    );
    job(root, &dataset, method, training)
}

/// The fixture's files, which a run's inputs borrow.
struct FixturePaths {
    model: std::path::PathBuf,
    train: std::path::PathBuf,
    validation: std::path::PathBuf,
}

impl FixturePaths {
    fn new(root: &Path) -> FixturePaths {
        FixturePaths {
            model: root.join("model"),
            train: root.join("data/train.jsonl"),
            validation: root.join("data/validation.jsonl"),
        }
    }

    fn inputs(&self) -> TrainingInputs<'_> {
        TrainingInputs {
            model_dir: &self.model,
            train_data: &self.train,
            validation_data: None,
            replay_data: None,
            parent: None,
            resume: None,
        }
    }
}

fn run_with(
    spec: &JobSpec,
    inputs: TrainingInputs,
    checkpoints: Option<&mut dyn CheckpointStore>,
    recorder: &mut dyn Reporter,
    cancel: &AtomicBool,
) -> Result<TrainOutcome> {
    let _turn = torch_rng_turn();
    train(spec, inputs, Device::Cpu, checkpoints, recorder, cancel)
}

fn run(spec: &JobSpec, root: &Path, recorder: &mut Recorder) -> Result<TrainOutcome> {
    run_with(
        spec,
        FixturePaths::new(root).inputs(),
        None,
        recorder,
        &AtomicBool::new(false),
    )
}

fn max_abs_diff(a: &PeftAdapter, b: &PeftAdapter) -> f64 {
    assert_eq!(a.tensors.len(), b.tensors.len());
    a.tensors
        .iter()
        .zip(&b.tensors)
        .map(|((ka, ta), (kb, tb))| {
            assert_eq!(ka, kb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

/// Two runs that must train alike: final losses and every adapter tensor within `tolerance`.
fn assert_trained_alike(a: &TrainOutcome, b: &TrainOutcome, tolerance: f64, what: &str) {
    assert!(
        (a.metrics.final_loss - b.metrics.final_loss).abs() < tolerance,
        "{what}: {:?} vs {:?}",
        a.metrics,
        b.metrics
    );
    let diff = max_abs_diff(&a.adapter, &b.adapter);
    assert!(diff < tolerance, "{what}: adapters differ by {diff}");
}

/// The fixture job learns, exports exactly PEFT's keys and shapes, and is bit-for-bit
/// reproducible on the CPU for a given seed.
#[test]
fn fixture_job_learns_exports_peft_layout_and_reproduces() {
    let root = fixture();
    let spec = fixture_job(
        root.path(),
        r#"{"type":"lora","r":8,"alpha":16,"target_modules":["q_proj","v_proj"]}"#,
        r#"{"max_steps":30,"learning_rate":0.001,"batch_size":4,"seq_len":64,"seed":0}"#,
    );
    let mut events = Recorder::default();
    let first = run(&spec, root.path(), &mut events).unwrap();
    let m = &first.metrics;
    assert!(
        m.final_loss < 0.8 * m.initial_loss,
        "loss did not fall enough: {m:?}"
    );
    assert_eq!(
        (m.steps, m.trainable_parameters),
        (30, 2 * (8 * 64 + 64 * 8) + 2 * (8 * 64 + 32 * 8))
    );
    assert_eq!(events.progress_steps(), (1..=30).collect::<Vec<_>>());
    assert_eq!(m.eval_loss, None);

    let out = tempfile::tempdir().unwrap();
    first.adapter.write(out.path()).unwrap();
    let mut written = Vec::new();
    read_safetensors(&out.path().join("adapter_model.safetensors"), |name, t| {
        written.push((name, t.size()))
    })
    .unwrap();
    written.sort();
    let mut expected = Vec::new();
    for layer in 0..2 {
        let p = format!("base_model.model.model.layers.{layer}.self_attn");
        expected.push((format!("{p}.q_proj.lora_A.weight"), vec![8, 64]));
        expected.push((format!("{p}.q_proj.lora_B.weight"), vec![64, 8]));
        expected.push((format!("{p}.v_proj.lora_A.weight"), vec![8, 64]));
        expected.push((format!("{p}.v_proj.lora_B.weight"), vec![32, 8]));
    }
    expected.sort();
    assert_eq!(written, expected);
    assert!(out.path().join("adapter_config.json").is_file());

    let second = run(&spec, root.path(), &mut Recorder::default()).unwrap();
    assert_eq!(second.metrics.final_loss, m.final_loss);
    for ((key, a), (_, b)) in first.adapter.tensors.iter().zip(&second.adapter.tensors) {
        assert!(a.equal(b), "{key} differs between runs with the same seed");
    }
}

/// A non-finite loss stops training as the user's error, naming the step.
#[test]
fn non_finite_loss_is_a_user_error_naming_the_step() {
    let root = fixture();
    // Poison the final norm: every logit becomes NaN, as a diverged run's would.
    let weights_path = root.path().join("model/model.safetensors");
    let mut weights = Vec::new();
    read_safetensors(&weights_path, |name, t| weights.push((name, t))).unwrap();
    for (name, tensor) in &mut weights {
        if name == "model.norm.weight" {
            *tensor = tensor.fill(f64::NAN);
        }
    }
    Tensor::write_safetensors(&weights, &weights_path).unwrap();
    let spec = fixture_job(
        root.path(),
        r#"{"type":"lora","r":4}"#,
        r#"{"max_steps":5,"learning_rate":0.001,"batch_size":2,"seq_len":32}"#,
    );
    let err = run(&spec, root.path(), &mut Recorder::default())
        .err()
        .expect("training should fail");
    assert!(matches!(classify(&err), Some(Failure::User(_))), "{err:#}");
    assert!(err.to_string().contains("became NaN at step 1"), "{err:#}");
}

/// Layer checkpointing recomputes each layer in the backward pass, with the same dropout
/// masks: the adapter is the one a run that kept every activation trains, with the layers'
/// inputs kept (`layers`) or offloaded (`offload`, on the CPU the same as `layers`). On the
/// CPU no GPU memory is reported (`null`), in the progress events and the metrics alike.
#[test]
fn checkpointed_layers_train_the_same_adapter() {
    let root = fixture();
    let method = r#"{"type":"lora","r":4,"dropout":0.1}"#;
    let training = |checkpointing: &str| {
        format!(
            r#"{{"max_steps":4,"learning_rate":0.002,"batch_size":2,"gradient_accumulation_steps":2,"seq_len":64,"seed":3,"gradient_checkpointing":"{checkpointing}"}}"#
        )
    };
    let plain = fixture_job(root.path(), method, &training("none"));
    let mut events = Recorder::default();
    let a = run(&plain, root.path(), &mut events).unwrap();
    for checkpointing in ["layers", "offload"] {
        let checkpointed = fixture_job(root.path(), method, &training(checkpointing));
        let b = run(&checkpointed, root.path(), &mut Recorder::default()).unwrap();
        assert_trained_alike(&a, &b, 1e-6, checkpointing);
    }
    // Dropout mattered: without it, the adapter is another.
    let no_dropout = fixture_job(
        root.path(),
        &method.replace("0.1", "0.0"),
        &training("layers"),
    );
    let c = run(&no_dropout, root.path(), &mut Recorder::default()).unwrap();
    assert!(max_abs_diff(&a.adapter, &c.adapter) > 1e-5);

    assert_eq!(a.metrics.peak_gpu_memory_bytes, None);
    assert!(events.0.iter().all(|e| !matches!(
        e,
        EventPayload::Progress {
            peak_gpu_memory_bytes: Some(_),
            ..
        }
    )));
}

/// k micro-batches of b rows make the same step as one batch of k * b rows.
#[test]
fn gradient_accumulation_matches_a_larger_batch() {
    let root = fixture();
    let method = r#"{"type":"lora","r":4,"dropout":0.0}"#;
    let whole = fixture_job(
        root.path(),
        method,
        r#"{"max_steps":6,"learning_rate":0.002,"batch_size":8,"seq_len":64,"seed":1,"schedule":"linear","warmup_steps":2}"#,
    );
    let accumulated = fixture_job(
        root.path(),
        method,
        r#"{"max_steps":6,"learning_rate":0.002,"batch_size":2,"gradient_accumulation_steps":4,"seq_len":64,"seed":1,"schedule":"linear","warmup_steps":2}"#,
    );
    let (mut whole_events, mut accumulated_events) = (Recorder::default(), Recorder::default());
    let a = run(&whole, root.path(), &mut whole_events).unwrap();
    let b = run(&accumulated, root.path(), &mut accumulated_events).unwrap();
    assert_eq!(
        accumulated_events.progress_steps(),
        (1..=6).collect::<Vec<_>>()
    );
    assert_eq!(a.metrics.tokens, b.metrics.tokens);
    assert_trained_alike(&a, &b, 1e-5, "accumulated");
}

/// Evaluation runs every `eval_every` steps and at the end, on a held-out fraction or on
/// the validation file, and its last loss is the metrics' `eval_loss`.
#[test]
fn validation_loss_is_reported_as_eval_events_and_metrics() {
    let root = fixture();
    let method = r#"{"type":"lora","r":4}"#;
    let training =
        r#"{"max_steps":12,"learning_rate":0.002,"batch_size":4,"seq_len":64,"eval_every":5}"#;
    let train_uri = format!("file://{}/data/train.jsonl", root.path().display());
    let evals = |events: &Recorder| -> Vec<(u32, f64, u64)> {
        events
            .0
            .iter()
            .filter_map(|e| {
                if let EventPayload::Eval { step, loss, tokens } = e {
                    Some((*step, *loss, *tokens))
                } else {
                    None
                }
            })
            .collect()
    };

    let split = job(
        root.path(),
        &format!(r#"{{"train":"{train_uri}","validation_fraction":0.1}}"#),
        method,
        training,
    );
    let mut events = Recorder::default();
    let outcome = run(&split, root.path(), &mut events).unwrap();
    let reported = evals(&events);
    assert_eq!(
        reported.iter().map(|e| e.0).collect::<Vec<_>>(),
        [5, 10, 12]
    );
    assert!(reported
        .iter()
        .all(|&(_, loss, tokens)| loss.is_finite() && tokens > 0));
    assert!(
        reported.windows(2).all(|w| w[0].2 == w[1].2),
        "one validation set throughout: {reported:?}"
    );
    assert_eq!(outcome.metrics.eval_loss, Some(reported[2].1));

    let paths = FixturePaths::new(root.path());
    let validation_uri = format!("file://{}", paths.validation.display());
    let separate = job(
        root.path(),
        &format!(r#"{{"train":"{train_uri}","validation":"{validation_uri}"}}"#),
        method,
        training,
    );
    let mut with_file = paths.inputs();
    with_file.validation_data = Some(&paths.validation);
    let mut events = Recorder::default();
    let outcome = run_with(
        &separate,
        with_file,
        None,
        &mut events,
        &AtomicBool::new(false),
    )
    .unwrap();
    let from_file = evals(&events);
    assert_eq!(
        from_file.iter().map(|e| e.0).collect::<Vec<_>>(),
        [5, 10, 12]
    );
    assert_ne!(
        from_file[0].2, reported[0].2,
        "the file, not a split, is evaluated"
    );
    assert_eq!(outcome.metrics.eval_loss, Some(from_file[2].1));
}

/// `epochs` ends training when the data has been seen that many times.
#[test]
fn epochs_cap_the_number_of_steps() {
    let root = fixture();
    // 400 examples in batches of 32 (8 x 4 accumulated): one epoch is 13 steps.
    let spec = fixture_job(
        root.path(),
        r#"{"type":"lora","r":2}"#,
        r#"{"max_steps":1000,"learning_rate":0.001,"batch_size":8,"gradient_accumulation_steps":4,"seq_len":32,"epochs":1}"#,
    );
    let mut events = Recorder::default();
    let outcome = run(&spec, root.path(), &mut events).unwrap();
    assert_eq!(outcome.metrics.steps, 13);
    assert_eq!(events.progress_steps().len(), 13);
    assert!(events.0.iter().any(|e| matches!(
        e,
        EventPayload::Progress {
            total_steps: 13,
            ..
        }
    )));
}

/// A run checkpointed, stopped, and resumed from its newest complete checkpoint ends with
/// the adapter of a run that never stopped: dropout, shuffling (packed rows here), warmup
/// and cosine decay, accumulation, clipping and weight decay all continue exactly.
#[test]
fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
    assert_resume_is_seamless(
        r#"{"type":"lora","r":4,"alpha":8,"dropout":0.1,"target_modules":["q_proj","v_proj","down_proj"]}"#,
    );
}

/// The adaptive-rank methods keep their state (importance averages, masks, gates and
/// their optimizer, schedules) in the checkpoint: resuming changes nothing either. The
/// checkpoint at step 5 falls inside AdaLoRA's pruning, IncreLoRA's and TriAdaptLoRA's
/// growth and CoDyRA's threshold schedule.
#[test]
fn adaptive_methods_resume_seamlessly() {
    for method in [
        r#"{"type":"adalora","init_r":4,"target_r":2,"tinit":2,"tfinal":3,"delta_t":2,"target_modules":["q_proj","v_proj"]}"#,
        r#"{"type":"sora","r":4,"lambda":0.01,"threshold":0.05,"target_modules":["q_proj","v_proj"]}"#,
        r#"{"type":"dylora","r":4,"target_modules":["q_proj","v_proj"]}"#,
        r#"{"type":"increlora","target_rank":2,"lora_r":1,"init_warmup":2,"incre_interval":2,"top_h":2,
            "incre_rank_num":1,"target_modules":["q_proj","v_proj"]}"#,
        r#"{"type":"triadaptlora","reference_rank":2,"init_rank":1,"incre_interval":2,"incre_rank_num":1,
            "target_modules":["q_proj","v_proj"]}"#,
        r#"{"type":"codyra","r":4,"max_kappa":0.05,"lambda_num":2,"dense_iters":0.25,"target_modules":["q_proj","v_proj"]}"#,
        // Calibrated once, before step 1: the resumed run takes the calibrated factors from the
        // checkpoint (calibrating again would reset them to their initial values).
        r#"{"type":"loraga","r":2,"batches":2,"target_modules":["q_proj","v_proj"]}"#,
        r#"{"type":"lorasb","r":3,"samples":5,"target_modules":["q_proj","v_proj"]}"#,
    ] {
        assert_resume_is_seamless(method);
    }
}

/// The gradient rules keep their optimizer state in the adapter's store (LoRA-Pro's Adam
/// moments of the equivalent gradient): a checkpoint carries it, and a resumed run continues
/// exactly.
#[test]
fn gradient_rules_resume_seamlessly() {
    for method in [
        r#"{"type":"lorapro","r":4,"alpha":8,"target_modules":["q_proj","v_proj"]}"#,
        r#"{"type":"allora","r":4,"eta":2,"target_modules":["q_proj","v_proj"]}"#,
        r#"{"type":"lora_ggpo","r":4,"sigma":0.3,"beta":0.5,"target_modules":["q_proj","v_proj"]}"#,
    ] {
        assert_resume_is_seamless(method);
    }
}

/// Runs `method` for 14 steps uninterrupted, and again stopped after step 7 and resumed
/// from its checkpoint at step 5: the two end with the same adapter and losses.
fn assert_resume_is_seamless(method: &str) {
    let root = fixture();
    let spec = fixture_job(
        root.path(),
        method,
        r#"{"max_steps":14,"learning_rate":0.003,"batch_size":2,"gradient_accumulation_steps":2,"seq_len":48,
            "seed":7,"schedule":"cosine","warmup_steps":3,"weight_decay":0.01,"max_grad_norm":0.5,
            "packing":true,"checkpoint_every":5}"#,
    );
    let uninterrupted = run(&spec, root.path(), &mut Recorder::default()).unwrap();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let store = Store::create(&format!("file://{}", store_dir.path().display())).unwrap();
    let job_id = uuid::Uuid::new_v4();
    let mut checkpoints = StoredCheckpoints::new(&runtime, store, job_id);

    /// Stops the run after step 7, i.e. two steps past the checkpoint at step 5.
    struct StopAfter<'a>(&'a AtomicBool, Recorder);
    impl Reporter for StopAfter<'_> {
        fn report(&mut self, event: EventPayload) {
            if matches!(event, EventPayload::Progress { step: 7, .. }) {
                self.0.store(true, Ordering::Relaxed);
            }
            self.1.report(event);
        }
    }
    let stop = AtomicBool::new(false);
    let mut first_attempt = StopAfter(&stop, Recorder::default());
    let paths = FixturePaths::new(root.path());
    let err = run_with(
        &spec,
        paths.inputs(),
        Some(&mut checkpoints),
        &mut first_attempt,
        &stop,
    )
    .err()
    .expect("the first attempt is stopped");
    assert!(
        matches!(classify(&err), Some(Failure::Cancelled)),
        "{err:#}"
    );
    let saved: Vec<_> = first_attempt
        .1
         .0
        .iter()
        .filter(|e| matches!(e, EventPayload::Checkpoint { .. }))
        .collect();
    assert_eq!(
        saved,
        [&EventPayload::Checkpoint {
            step: 5,
            prefix: checkpoint_prefix(&job_id, 5),
            resumed: false
        }]
    );

    let latest = checkpoints
        .latest()
        .unwrap()
        .expect("the checkpoint at step 5");
    let mut resumed_inputs = paths.inputs();
    resumed_inputs.resume = Some(latest);
    let mut second_attempt = Recorder::default();
    let resumed = run_with(
        &spec,
        resumed_inputs,
        Some(&mut checkpoints),
        &mut second_attempt,
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(
        second_attempt
            .0
            .iter()
            .find(|e| matches!(e, EventPayload::Checkpoint { .. })),
        Some(&EventPayload::Checkpoint {
            step: 5,
            prefix: checkpoint_prefix(&job_id, 5),
            resumed: true
        })
    );
    assert_eq!(
        second_attempt.progress_steps(),
        (6..=14).collect::<Vec<_>>()
    );
    assert_eq!(
        uninterrupted.adapter.config.as_lora().unwrap().rank_pattern,
        resumed.adapter.config.as_lora().unwrap().rank_pattern,
        "{method}"
    );
    let diff = max_abs_diff(&uninterrupted.adapter, &resumed.adapter);
    assert!(
        diff <= 1e-6,
        "{method}: the resumed adapter differs by {diff}"
    );
    let (a, b) = (&uninterrupted.metrics, &resumed.metrics);
    assert_eq!(
        (a.steps, a.tokens, a.initial_loss),
        (b.steps, b.tokens, b.initial_loss)
    );
    assert!(
        (a.final_loss - b.final_loss).abs() <= 1e-6,
        "{method}: {a:?} vs {b:?}"
    );
}

fn checkpoint_prefix(job_id: &uuid::Uuid, step: u32) -> String {
    loraforge_storage::layout::checkpoint_prefix(&job_id.to_string(), step)
}

/// A parent adapter's factors are where training starts; one of another rank is refused.
#[test]
fn training_continues_from_a_parent_adapter() {
    let root = fixture();
    let parent_spec = fixture_job(
        root.path(),
        r#"{"type":"lora","r":4}"#,
        r#"{"max_steps":5,"learning_rate":0.005,"batch_size":4,"seq_len":32}"#,
    );
    let parent = run(&parent_spec, root.path(), &mut Recorder::default())
        .unwrap()
        .adapter;
    // One step at a tiny learning rate: the child is its parent, nearly.
    let child_spec = fixture_job(
        root.path(),
        r#"{"type":"lora","r":4}"#,
        r#"{"max_steps":1,"learning_rate":1e-9,"batch_size":4,"seq_len":32,"max_grad_norm":null}"#,
    );
    let paths = FixturePaths::new(root.path());
    let mut child_inputs = paths.inputs();
    child_inputs.parent = Some(&parent);
    let child = run_with(
        &child_spec,
        child_inputs,
        None,
        &mut Recorder::default(),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert!(max_abs_diff(&parent, &child.adapter) < 1e-6);
    assert!(parent
        .tensors
        .iter()
        .any(|(_, t)| t.abs().sum(Kind::Float).double_value(&[]) > 0.0));

    let misfit = fixture_job(
        root.path(),
        r#"{"type":"lora","r":8}"#,
        r#"{"max_steps":1,"learning_rate":0.001,"batch_size":4,"seq_len":32}"#,
    );
    let mut misfit_inputs = paths.inputs();
    misfit_inputs.parent = Some(&parent);
    let err = run_with(
        &misfit,
        misfit_inputs,
        None,
        &mut Recorder::default(),
        &AtomicBool::new(false),
    )
    .err()
    .expect("a parent of another rank is refused");
    assert!(matches!(classify(&err), Some(Failure::User(_))), "{err:#}");
    assert!(err.to_string().contains("ranks differ"), "{err:#}");
}

/// The base model's side of the safety evaluation, stored by one evaluation and read back by
/// the next, gives the same report as measuring it again (the refusal direction included); the
/// second evaluation does half the work (its progress counts one model) and reports progress
/// after every batch. The model evaluated alone gives the base side's numbers, measured or read
/// back.
#[test]
fn the_evaluation_reuses_the_base_side_with_the_same_numbers() {
    use crate::eval::safety::{self, baseline::DirectoryCache, Context, Progress, Reuse};
    let root = fixture();
    let spec = fixture_job(
        root.path(),
        r#"{"type":"lora","r":4,"alpha":8,"target_modules":["q_proj","v_proj"]}"#,
        r#"{"max_steps":10,"learning_rate":0.01,"batch_size":4,"seq_len":64,"seed":0}"#,
    );
    let adapter = run(&spec, root.path(), &mut Recorder::default())
        .unwrap()
        .adapter;
    let paths = FixturePaths::new(root.path());
    let settings = safety::Settings {
        max_new_tokens: 8,
        ..Default::default()
    };
    let cache = DirectoryCache {
        root: root.path().join("baselines"),
    };
    let cancel = AtomicBool::new(false);
    let evaluate = |reuse: bool| {
        let mut seen = Vec::new();
        let context = Context {
            device: Device::Cpu,
            cancel: &cancel,
            reuse: reuse.then_some(Reuse {
                cache: &cache,
                model_digest: "fixture",
            }),
            progress: &mut |p: Progress| seen.push(p),
        };
        let report = safety::evaluate(
            &paths.model,
            &adapter,
            Some(&paths.validation),
            &settings,
            context,
        )
        .unwrap();
        let mut report = serde_json::to_value(report).unwrap();
        report.as_object_mut().unwrap().remove("seconds");
        (report, seen)
    };
    let (measured, measured_progress) = evaluate(false);
    let (stored, stored_progress) = evaluate(true);
    let (reused, reused_progress) = evaluate(true);
    assert_eq!(measured, stored);
    assert_eq!(measured, reused, "a reused base side changed the report");
    let direction = &measured["refusal_direction"];
    assert_eq!(direction["layers"], 2, "{direction}");
    assert!(direction["layer"].as_u64().unwrap() < 2, "{direction}");
    for field in ["separation_base", "effect_size_base"] {
        assert!(direction[field].as_f64().unwrap() > 0.0, "{direction}");
    }
    assert!(
        direction["harmful_shift"].as_f64().unwrap() != 0.0,
        "the adapter moved the activations: {direction}"
    );

    let alone = |reuse: bool| {
        let context = Context {
            device: Device::Cpu,
            cancel: &cancel,
            reuse: reuse.then_some(Reuse {
                cache: &cache,
                model_digest: "fixture",
            }),
            progress: &mut |_| {},
        };
        let report =
            safety::evaluate_model(&paths.model, Some(&paths.validation), &settings, context)
                .unwrap();
        serde_json::to_value(report).unwrap()
    };
    for model in [alone(false), alone(true)] {
        assert_eq!(model["refusal_rate"], measured["refusal_rate_base"]);
        assert_eq!(model["perplexity"], measured["perplexity_base"]);
        let side = &model["refusal_direction"];
        assert_eq!(side["layer"], direction["layer"], "{side}");
        assert_eq!(side["separation"], direction["separation_base"], "{side}");
        assert_eq!(side["per_layer"].as_array().unwrap().len(), 2, "{side}");
    }
    // 100 harmful requests and 20 benign prompts per model: progress after every decoding step
    // (up to 8, fewer when every answer ends early) and after the benign prompts.
    let per_model = 120;
    for (progress, total) in [
        (&measured_progress, 2 * per_model),
        (&stored_progress, 2 * per_model),
        (&reused_progress, per_model),
    ] {
        assert_eq!(progress.last(), Some(&Progress { done: total, total }));
        assert!(
            progress.windows(2).all(|w| w[0].done < w[1].done),
            "{progress:?}"
        );
        let models = total as usize / per_model as usize;
        assert!(
            (3 * models..=9 * models).contains(&progress.len()),
            "{progress:?}"
        );
    }
    let entries = std::fs::read_dir(&cache.root).unwrap().count();
    assert_eq!(entries, 1, "one stored base side, no partial entry left");
}

/// `safety.replay` mixes its share of refusal examples into the training examples (never the
/// validation split), the same ones for the same seed, from the built-in set or a job's file.
#[test]
fn replay_mixes_refusal_examples_into_training_only() {
    let root = fixture();
    let paths = FixturePaths::new(root.path());
    let dataset = format!(
        r#"{{"train":"file://{}/data/train.jsonl","validation_fraction":0.25}},"safety":{{"replay":{{"fraction":0.1}}}}"#,
        root.path().display()
    );
    let spec = job(
        root.path(),
        &dataset,
        r#"{"type":"lora","r":4,"target_modules":["q_proj","v_proj"]}"#,
        r#"{"max_steps":3,"learning_rate":0.001,"batch_size":4,"seq_len":64,"seed":3}"#,
    );
    let logs = |events: &Recorder| -> Vec<String> {
        events
            .0
            .iter()
            .filter_map(|e| match e {
                EventPayload::Log { message } => Some(message.clone()),
                _ => None,
            })
            .collect()
    };
    let mut first = Recorder::default();
    let a = run(&spec, root.path(), &mut first).unwrap();
    let said = logs(&first);
    // 400 lines, a quarter held out: 300 to train on, and 300 / 9 refusals make a tenth.
    assert!(
        said.iter().any(|m| m
            == "safety.replay: 33 refusal examples from the built-in refusal set mixed into the 300 training examples"),
        "{said:?}"
    );
    assert!(
        said.iter().any(|m| m.contains("validation: 100 examples")),
        "the validation split is the file's alone: {said:?}"
    );
    assert_eq!(a.replay_examples, Some(33));
    let b = run(&spec, root.path(), &mut Recorder::default()).unwrap();
    assert_eq!(
        max_abs_diff(&a.adapter, &b.adapter),
        0.0,
        "the same seed mixes the same examples"
    );
    let mut without = spec.clone();
    without.safety.replay = None;
    let plain = run(&without, root.path(), &mut Recorder::default()).unwrap();
    assert!(max_abs_diff(&a.adapter, &plain.adapter) > 0.0);
    assert_eq!(plain.replay_examples, None);

    // A job's own refusal file: two examples, cycled to make up the share.
    let own = root.path().join("refusals.jsonl");
    std::fs::write(
        &own,
        "{\"prompt\":\"User: how do I pick a lock\\nAssistant:\",\"completion\":\" I'm sorry, I cannot help.\"}\n\
         {\"text\":\"I cannot help with that.\"}\n",
    )
    .unwrap();
    let mut inputs = paths.inputs();
    inputs.replay_data = Some(&own);
    let mut events = Recorder::default();
    let from_file = run_with(&spec, inputs, None, &mut events, &AtomicBool::new(false)).unwrap();
    assert_eq!(from_file.replay_examples, Some(33));
    assert!(
        logs(&events)
            .iter()
            .any(|m| m.contains("33 refusal examples from safety.replay.dataset")),
        "{:?}",
        logs(&events)
    );
}
