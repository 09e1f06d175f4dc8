"""SGLang's ServerArgs fields and their defaults, as facts about SGLang (sgl-project/sglang
python/sglang/srt/server_args.py at 001067f, December 2026), for `config.engine_args_from_sglang`.

A framework may build its engine from a whole ServerArgs (`Engine(**asdict(server_args))`) or pass a few of its
settings. A field given at SGLang's default asks nothing of hotswap and is accepted; a `RUN_ONLY` field (logging,
kernel and graph choices, scheduling heuristics, loader threads) changes how SGLang runs, not what it returns, and is
accepted at any value, as is a `LORA_ONLY` field (hotswap serves no LoRA); any other field away from its default is
refused by name.
"""

from __future__ import annotations

#: a default that is not a plain value (a factory or an expression): the field is accepted only where it is RUN_ONLY
NOT_COMPARABLE = object()

SGLANG_DEFAULTS: dict[str, object] = {
    'tokenizer_path': None, 'tokenizer_mode': 'auto', 'tokenizer_backend': 'huggingface', 'tokenizer_worker_num': 1,
    'detokenizer_worker_num': 1, 'skip_tokenizer_init': False, 'load_format': 'auto', 'model_loader_extra_config': '{}',
    'trust_remote_code': False, 'context_length': None, 'is_embedding': False, 'enable_multimodal': None, 'revision':
    None, 'model_impl': 'auto', 'model_config_parser': 'auto', 'json_model_override_args': '{}', 'dtype': 'auto',
    'quantization': None, 'quantization_param_path': None, 'kv_cache_dtype': 'auto', 'enable_fp32_lm_head': False,
    'modelopt_quant': None, 'modelopt_checkpoint_restore_path': None, 'modelopt_checkpoint_save_path': None,
    'modelopt_export_path': None, 'quantize_and_serve': False, 'rl_quant_profile': None, 'enable_tf32_matmul': False,
    'mem_fraction_static': None, 'max_running_requests': None, 'max_queued_requests': None, 'max_total_tokens': None,
    'chunked_prefill_size': None, 'prefill_decode_interval': 0, 'enable_dynamic_chunking': False, 'max_prefill_tokens':
    16384, 'prefill_max_requests': None, 'schedule_policy': 'fcfs', 'enable_priority_scheduling': False,
    'disable_priority_preemption': False, 'default_priority_value': None, 'abort_on_priority_when_disabled': False,
    'schedule_low_priority_values_first': False, 'priority_scheduling_preemption_threshold': 10, 'retraction_policy':
    'length', 'schedule_conservativeness': 1.0, 'page_size': None, 'c128_page_size': 16, 'swa_full_tokens_ratio': 0.8,
    'disable_hybrid_swa_memory': False, 'radix_eviction_policy': 'lru', 'prefill_only_disable_kv_cache': False,
    'disable_radix_cache': False, 'enable_page_major_kv_layout': False, 'enable_unified_memory': False,
    'disable_chunked_prefix_cache': False, 'disable_overlap_schedule': False, 'num_continuous_decode_steps': 1,
    'scheduler_recv_interval': 1, 'enable_mixed_chunk': False, 'nccl_port': None, 'dist_timeout': None,
    'dist_init_addr': None, 'gated_launch_port': None, 'nnodes': 1, 'node_rank': 0, 'tp_size': 1, 'dcp_size': 1,
    'pp_size': 1, 'pp_max_micro_batch_size': None, 'pp_async_batch_depth': 0, 'dp_size': 1, 'load_balance_method':
    'auto', 'attn_cp_size': 1, 'moe_dp_size': 1, 'dwdp_size': 1, 'dcp_comm_backend': 'ag_rs', 'dcp_replicate_q_proj':
    None, 'enable_prefill_cp': False, 'cp_strategy': None, 'enable_dsa_cache_layer_split': False,
    'enable_dsa_prefill_context_parallel': False, 'dsa_prefill_cp_mode': 'round-robin-split',
    'enable_prefill_context_parallel': False, 'prefill_cp_mode': 'in-seq-split', 'enable_cp_decode_attn_tp': False,
    'enable_dp_attention': False, 'enable_dp_attention_local_control_broadcast': False, 'enable_dp_lm_head': False,
    'enable_tp_lm_head_all_to_all': None, 'enable_attn_tp_input_scattered': False, 'enable_shared_experts_attn_tp':
    False, 'enable_dense_mlp_attn_tp': False, 'disable_attn_tp_gather': False, 'enable_p2p_check': False, 'device':
    None, 'base_gpu_id': 0, 'gpu_id_step': 1, 'random_seed': None, 'mlx_enable_sampling': False, 'watchdog_timeout':
    300, 'soft_watchdog_timeout': None, 'sleep_on_idle': False, 'use_ray': False, 'custom_sigquit_handler': None,
    'numa_node': None, 'gc_threshold': None, 'host': '127.0.0.1', 'port': 30000, 'fastapi_root_path': '',
    'smg_grpc_mode': False, 'grpc_mode': False, 'grpc_port': None, 'sidecar': None, 'sidecar_args': None,
    'skip_server_warmup': False, 'warmups': None, 'enable_http2': False, 'http2_max_concurrent_streams': 200,
    'ssl_keyfile': None, 'ssl_certfile': None, 'ssl_ca_certs': None, 'ssl_keyfile_password': None, 'enable_ssl_refresh':
    False, 'api_key': None, 'admin_api_key': None, 'served_model_name': None, 'weight_version': 'default',
    'chat_template': None, 'hf_chat_template_name': None, 'completion_template': None, 'file_storage_path':
    'sglang_storage', 'enable_cache_report': False, 'reasoning_parser': None, 'default_chat_template_kwargs': None,
    'strip_thinking_cache': False, 'enable_strict_thinking': False, 'tool_call_parser': None, 'tool_server': None,
    'sampling_defaults': 'model', 'asr_max_buffer_seconds': 60, 'asr_max_concurrent_sessions': 32,
    'preferred_sampling_params': None, 'allow_auto_truncate': False, 'stream_interval': 1, 'batch_notify_size': 16,
    'stream_response_default_include_usage': False, 'incremental_streaming_output': False, 'enable_streaming_session':
    False, 'enable_session_radix_cache': False, 'log_level': 'info', 'log_level_http': None, 'log_requests': False,
    'log_requests_level': 2, 'log_requests_format': 'text', 'log_requests_target': None,
    'uvicorn_access_log_exclude_prefixes': NOT_COMPARABLE, 'crash_dump_folder': None, 'show_time_cost': False,
    'enable_metrics': False, 'smg_http_sidecar_port': None, 'enable_mfu_metrics': False,
    'enable_metrics_for_all_schedulers': False, 'load_snapshot_publish_interval': 15,
    'tokenizer_metrics_custom_labels_header': 'x-custom-labels', 'tokenizer_metrics_allowed_custom_labels': None,
    'extra_metric_labels': None, 'bucket_time_to_first_token': None, 'bucket_inter_token_latency': None,
    'bucket_e2e_request_latency': None, 'prompt_tokens_buckets': None, 'generation_tokens_buckets': None,
    'gc_warning_threshold_secs': 0.0, 'decode_log_interval': 40, 'enable_request_time_stats_logging': False,
    'kv_events_config': None, 'enable_forward_pass_metrics': False, 'forward_pass_metrics_worker_id': '',
    'forward_pass_metrics_ipc_name': None, 'enable_trace': False, 'trace_modules': 'request', 'otlp_traces_endpoint':
    'localhost:4317', 'export_metrics_to_file': False, 'export_metrics_to_file_dir': None, 'stat_loggers': None,
    'constrained_json_whitespace_pattern': None, 'constrained_json_disable_any_whitespace': False, 'attention_backend':
    None, 'decode_attention_backend': None, 'prefill_attention_backend': None, 'sampling_backend': None,
    'grammar_backend': None, 'radix_cache_backend': None, 'mm_attention_backend': None, 'fp8_gemm_runner_backend':
    'auto', 'fp4_gemm_runner_backend': 'auto', 'bf16_gemm_backend': 'auto', 'dsa_prefill_backend': None,
    'dsv4_prefill_backend': 'auto', 'dsa_decode_backend': None, 'dsa_paged_mqa_logits_backend': 'auto',
    'dsa_topk_backend': 'sgl-kernel', 'disable_flashinfer_autotune': False, 'flashinfer_autotune_skip_ops': None,
    'mamba_backend': 'triton', 'cuda_graph_config': None, 'cuda_graph_backend_decode': None,
    'cuda_graph_backend_prefill': None, 'cuda_graph_max_bs_decode': None, 'cuda_graph_max_bs_prefill': None,
    'cuda_graph_bs_decode': None, 'cuda_graph_bs_prefill': None, 'cuda_graph_tc_compiler': None,
    'disable_prefill_cuda_graph': False, 'disable_decode_cuda_graph': False, 'disable_cuda_graph': False,
    'disable_cuda_graph_padding': False, 'enable_profile_cuda_graph': False, 'enable_cudagraph_gc': False,
    'debug_cuda_graph': False, 'enable_layerwise_nvtx_marker': False, 'enable_nccl_nvls': False, 'enable_symm_mem':
    False, 'triton_attention_reduce_in_fp32': False, 'triton_attention_num_kv_splits': 8,
    'triton_attention_split_tile_size': None, 'flashinfer_mla_disable_ragged': False, 'enable_fused_qk_norm_rope':
    False, 'enable_precise_embedding_interpolation': False, 'enable_fused_moe_sum_all_reduce': False,
    'enable_deepseek_v4_fp4_indexer': False, 'disable_custom_all_reduce': False, 'enable_mscclpp': False,
    'enable_torch_symm_mem': False, 'enable_scattered_sconv': False, 'pre_warm_nccl': False,
    'enable_quant_communications': False, 'enable_flashinfer_allreduce_fusion': False,
    'enforce_disable_flashinfer_allreduce_fusion': False, 'flashinfer_allreduce_fusion_backend': None,
    'enable_aiter_allreduce_fusion': False, 'enable_torch_compile': False, 'enable_torch_compile_debug_mode': False,
    'torch_compile_max_bs': 32, 'speculative_algorithm': None, 'speculative_draft_model_path': None,
    'speculative_draft_model_revision': None, 'speculative_draft_load_format': None, 'speculative_num_steps': None,
    'speculative_eagle_topk': None, 'speculative_num_draft_tokens': None, 'speculative_dflash_block_size': None,
    'speculative_dspark_block_size': None, 'speculative_dspark_sps_table_path': None,
    'speculative_dspark_confidence_sts_path': None, 'speculative_dspark_align_verify_tokens_to_graph_tier': False,
    'speculative_accept_threshold_single': 1.0, 'speculative_accept_threshold_acc': 1.0,
    'speculative_use_rejection_sampling': False, 'speculative_token_map': None, 'speculative_attention_mode': 'prefill',
    'speculative_draft_attention_backend': None, 'speculative_dsa_topk_backend': 'sgl-kernel',
    'speculative_draft_kv_cache_dtype': None, 'speculative_draft_window_size': None, 'speculative_moe_runner_backend':
    None, 'speculative_moe_a2a_backend': None, 'speculative_draft_model_quantization': None,
    'speculative_skip_dp_mlp_sync': False, 'enable_multi_layer_eagle': False, 'speculative_adaptive': False,
    'speculative_adaptive_config': None, 'decoupled_spec_bind_endpoint': None, 'decoupled_spec_connect_endpoints': None,
    'decoupled_spec_rank': None, 'decoupled_spec_role': 'null', 'spec_trace_dir': None,
    'speculative_ngram_min_bfs_breadth': 1, 'speculative_ngram_max_bfs_breadth': 10, 'speculative_ngram_match_type':
    'BFS', 'speculative_ngram_max_trie_depth': 18, 'speculative_ngram_capacity': NOT_COMPARABLE,
    'speculative_ngram_external_corpus_path': None, 'speculative_ngram_external_sam_budget': 0,
    'speculative_ngram_external_corpus_max_tokens': 10000000, 'ep_size': 1, 'moe_a2a_backend': 'none',
    'enable_w4a4_mxfp4_megamoe': False, 'deepep_v2_mode': 'direct', 'moe_runner_backend': 'auto',
    'flashinfer_mxfp4_moe_precision': 'default', 'deepep_mode': 'auto', 'fuseep_mode': 2,
    'deepep_dispatcher_output_dtype': 'auto', 'ep_num_redundant_experts': 0, 'ep_dispatch_algorithm': None,
    'init_expert_location': 'trivial', 'enable_eplb': False, 'eplb_algorithm': 'auto', 'eplb_rebalance_num_iterations':
    1000, 'eplb_rebalance_layers_per_chunk': None, 'eplb_min_rebalancing_utilization_threshold': 1.0,
    'expert_distribution_recorder_mode': None, 'expert_distribution_recorder_buffer_size': None,
    'expert_balancedness_report_mode': 'off', 'deepep_config': None, 'moe_dense_tp_size': None, 'elastic_ep_backend':
    None, 'enable_elastic_expert_backup': False, 'mooncake_ib_device': None, 'enable_waterfill': False, 'ep_join_mode':
    None, 'ep_join_rank_offset': 0, 'elastic_ep_initial_size': None, 'max_ep_size': None, 'elastic_ep_scale_timeout':
    600, 'elastic_ep_rejoin': False, 'disable_flashinfer_cutlass_moe_fp4_allgather': False,
    'disable_shared_experts_fusion': False, 'enforce_shared_experts_fusion': False, 'max_mamba_cache_size': None,
    'mamba_ssm_dtype': None, 'mamba_max_states_per_path': -1, 'enable_mamba_cache_stochastic_rounding': False,
    'mamba_cache_philox_rounds': 0, 'mamba_full_memory_ratio': 0.9, 'mamba_radix_cache_strategy': 'auto',
    'uses_mamba_radix_cache': False, 'mamba_track_interval': 256, 'enable_int8_mamba_checkpoint': False,
    'int8_mamba_ckpt_size': None, 'linear_attn_backend': 'triton', 'linear_attn_decode_backend': None,
    'linear_attn_prefill_backend': None, 'linear_attn_verify_backend': None, 'enable_linear_replayssm': False,
    'linear_replayssm_cache_len': 16, 'enable_linear_replayssm_spec': False, 'enable_hierarchical_cache': False,
    'hicache_host_memory_mode': 'cache', 'hicache_ratio': None, 'hicache_size': 0, 'hicache_write_policy':
    'write_through', 'hicache_io_backend': 'kernel', 'hicache_mem_layout': 'page_first', 'hicache_storage_backend':
    None, 'hicache_storage_prefetch_policy': 'timeout', 'hicache_storage_backend_extra_config': None, 'enable_hisparse':
    False, 'hisparse_config': None, 'enable_broadcast_mm_inputs_process': False, 'enable_prefix_mm_cache': False,
    'mm_enable_dp_encoder': False, 'mm_process_config': None, 'mm_processor_worker_num': 0, 'mm_io_worker_num': 0,
    'allowed_media_domains': NOT_COMPARABLE, 'media_url_max_file_size_mb': 64, 'mm_preprocess_cache_size_mb': None,
    'trust_mm_content_hashes': False, 'limit_mm_data_per_request': None, 'enable_mm_global_cache': False,
    'image_processor_backend': 'auto', 'mm_global_cache_backend': 'mooncake', 'disable_fast_image_processor': False,
    'mm_feature_transport': None, 'keep_mm_feature_on_device': False, 'enable_lora': None,
    'enable_lora_overlap_loading': None, 'max_lora_rank': None, 'lora_target_modules': None, 'lora_paths': None,
    'max_loaded_loras': None, 'max_loras_per_batch': 8, 'lora_eviction_policy': 'lru', 'lora_backend': 'csgmv',
    'max_lora_chunk_size': 16, 'experts_shared_outer_loras': None, 'lora_use_virtual_experts': False,
    'lora_strict_loading': False, 'lora_drain_wait_threshold': 0.0, 'enable_two_batch_overlap': False,
    'enable_single_batch_overlap': False, 'tbo_token_distribution_threshold': 0.48, 'cpu_offload_gb': 0,
    'offload_group_size': -1, 'offload_num_in_group': 1, 'offload_prefetch_step': 1, 'offload_mode': 'cpu',
    'enable_lmcache': False, 'lmcache_config_file': None, 'enable_flexkv': False, 'flexkv_config_file': None,
    'kt_weight_path': None, 'kt_method': 'AMXINT4', 'kt_cpuinfer': None, 'kt_threadpool_count': 2, 'kt_num_gpu_experts':
    None, 'kt_max_deferred_experts_per_token': None, 'dllm_algorithm': None, 'dllm_algorithm_config': None, 'dllm_fdfo':
    True, 'disaggregation_mode': 'null', 'disaggregation_transfer_backend': 'mooncake', 'disaggregation_bootstrap_port':
    8998, 'disaggregation_ib_device': None, 'disaggregation_decode_enable_radix_cache': False,
    'disaggregation_decode_enable_offload_kvcache': False, 'disaggregation_decode_retraction_backup': None,
    'num_reserved_decode_tokens': 512, 'disaggregation_decode_extra_slots': None,
    'disaggregation_decode_polling_interval': 1, 'optimistic_prefill_attempts': 0, 'encoder_only': False,
    'language_only': False, 'language_model_only': False, 'encoder_transfer_backend': NOT_COMPARABLE, 'encoder_urls':
    NOT_COMPARABLE, 'encoder_bootstrap_port': 8997, 'encoder_register_urls': NOT_COMPARABLE,
    'enable_adaptive_dispatch_to_encoder': False, 'enable_pdmux': False, 'pdmux_config_path': None, 'sm_group_num': 8,
    'startup_weight_load_mode': 'serial', 'custom_weight_loader': None, 'weight_loader_disable_mmap': False,
    'weight_loader_prefetch_checkpoints': False, 'weight_loader_prefetch_num_threads': 4,
    'weight_loader_drop_cache_after_load': False, 'remote_instance_weight_loader_seed_instance_ip': None,
    'remote_instance_weight_loader_seed_instance_service_port': None,
    'remote_instance_weight_loader_send_weights_group_ports': None, 'remote_instance_weight_loader_backend': 'nccl',
    'remote_instance_weight_loader_start_seed_via_transfer_engine': False, 'engine_info_bootstrap_port': 6789,
    'modelexpress_config': None, 'download_dir': None, 'model_checksum': None, 'delete_ckpt_after_loading': False,
    'decrypted_config_file': None, 'decrypted_draft_config_file': None, 'checkpoint_engine_wait_weights_before_ready':
    False, 'enable_prefill_delayer': False, 'prefill_delayer_max_delay_passes': 30,
    'prefill_delayer_token_usage_low_watermark': None, 'prefill_delayer_forward_passes_buckets': None,
    'prefill_delayer_wait_seconds_buckets': None, 'prefill_delayer_queue_min_ratio': None,
    'prefill_delayer_max_delay_ms': None, 'min_free_slots_delay': None, 'enable_deterministic_inference': False,
    'rl_on_policy_target': None, 'kv_canary': 'none', 'kv_canary_real_data': 'none', 'kv_canary_sweep_interval': 0,
    'enable_dynamic_batch_tokenizer': False, 'dynamic_batch_tokenizer_batch_size': 32,
    'dynamic_batch_tokenizer_batch_timeout': 0.002, 'enable_tokenizer_batch_encode': False,
    'disable_tokenizer_batch_decode': False, 'debug_tensor_dump_output_folder': None, 'debug_tensor_dump_layers': None,
    'debug_tensor_dump_input_file': None, 'enable_memory_saver': False, 'enable_weights_cpu_backup': False,
    'enable_draft_weights_cpu_backup': False, 'enable_custom_logit_processor': False, 'enable_return_hidden_states':
    False, 'return_hidden_states_mode': None, 'enable_return_routed_experts': False, 'enable_return_indexer_topk':
    False, 'disable_outlines_disk_cache': False, 'enable_mis': False, 'weight_cache_mode': 'off', 'weight_cache_socket':
    None, 'weight_cache_timeout': 1800, 'forward_hooks': None, 'msprobe_dump_config': None,
}

# Names earlier SGLang releases had and frameworks still pass (their SGLang defaults): the older graph flags, and the
# streaming flag before its rename (config's aliases map cuda_graph_max_bs and stream_output to ours)
SGLANG_DEFAULTS.update({"cuda_graph_max_bs": None, "cuda_graph_bs": None, "stream_output": False})

# launch_server switches whose ServerArgs default is None (unset) rather than False: the bare flag sets True, as in
# SGLang's own launch lines (`--enable-lora`, `--enable-multimodal`)
NONE_DEFAULT_SWITCHES = frozenset({"enable_lora", "enable_multimodal"})

# fields SGLang annotates float whose default is written as an int: its launch_server flag takes a fraction
# (`watchdog_timeout: A[float, ...] = 300`)
FLOAT_FIELDS = frozenset({"watchdog_timeout"})

# the chat output parsers hotswap serves (server/chat_parsers/: one module per parser family), under SGLang's names (ReasoningParser.DetectorMap,
# FunctionCallParser.ToolCallParserEnum): qwen3-thinking is Qwen3Detector always reasoning; qwen is qwen25's newer name
REASONING_PARSERS = ("deepseek-r1", "qwen3", "qwen3-thinking")
TOOL_CALL_PARSERS = ("qwen", "qwen25", "qwen3_coder")

# launch_server's other spellings of a field (its argparse also takes any unique prefix of a flag)
FLAG_ALIASES = {"dp": "dp_size", "data_parallel_size": "dp_size", "pp": "pp_size", "pipeline_parallel_size": "pp_size",
                "ep": "ep_size", "expert_parallel_size": "ep_size"}

RUN_ONLY: frozenset[str] = frozenset({
    'cuda_graph_bs', 'nccl_port', 'dist_timeout', 'enable_p2p_check', 'cpu_offload_gb', 'engine_info_bootstrap_port',
    'attention_backend', 'batch_notify_size', 'bf16_gemm_backend', 'bucket_e2e_request_latency',
    'bucket_inter_token_latency', 'bucket_time_to_first_token', 'crash_dump_folder', 'cuda_graph_backend_decode',
    'cuda_graph_backend_prefill', 'cuda_graph_bs_decode', 'cuda_graph_bs_prefill', 'cuda_graph_config',
    'cuda_graph_max_bs_decode', 'cuda_graph_max_bs_prefill', 'cuda_graph_tc_compiler', 'custom_sigquit_handler',
    'debug_cuda_graph', 'decode_attention_backend', 'decode_log_interval', 'deepep_config',
    'deepep_dispatcher_output_dtype', 'deepep_mode', 'deepep_v2_mode', 'detokenizer_worker_num',
    'disable_chunked_prefix_cache', 'disable_cuda_graph', 'disable_cuda_graph_padding', 'disable_custom_all_reduce',
    'disable_decode_cuda_graph', 'disable_flashinfer_autotune', 'disable_flashinfer_cutlass_moe_fp4_allgather',
    'disable_outlines_disk_cache', 'disable_overlap_schedule', 'disable_prefill_cuda_graph',
    'disable_shared_experts_fusion', 'disable_tokenizer_batch_decode', 'download_dir', 'dsa_decode_backend',
    'dsa_paged_mqa_logits_backend', 'dsa_prefill_backend', 'dsa_topk_backend', 'dsv4_prefill_backend',
    'dynamic_batch_tokenizer_batch_size', 'dynamic_batch_tokenizer_batch_timeout', 'elastic_ep_backend',
    'elastic_ep_initial_size', 'elastic_ep_rejoin', 'elastic_ep_scale_timeout', 'enable_aiter_allreduce_fusion',
    'enable_cache_report', 'enable_cudagraph_gc', 'enable_deepseek_v4_fp4_indexer', 'enable_draft_weights_cpu_backup',
    'enable_dynamic_batch_tokenizer', 'enable_dynamic_chunking', 'enable_elastic_expert_backup', 'enable_eplb',
    'enable_flashinfer_allreduce_fusion', 'enable_forward_pass_metrics', 'enable_fused_moe_sum_all_reduce',
    'enable_fused_qk_norm_rope', 'enable_hierarchical_cache', 'enable_http2', 'enable_layerwise_nvtx_marker',
    'enable_metrics', 'enable_metrics_for_all_schedulers', 'enable_mfu_metrics', 'enable_mixed_chunk', 'enable_mscclpp',
    'enable_nccl_nvls', 'enable_page_major_kv_layout', 'enable_precise_embedding_interpolation',
    'enable_prefill_delayer', 'enable_profile_cuda_graph', 'enable_quant_communications',
    'enable_request_time_stats_logging', 'enable_scattered_sconv', 'enable_single_batch_overlap', 'enable_symm_mem',
    'enable_tokenizer_batch_encode', 'enable_torch_compile', 'enable_torch_compile_debug_mode', 'enable_torch_symm_mem',
    'enable_trace', 'enable_two_batch_overlap', 'enable_w4a4_mxfp4_megamoe', 'enable_waterfill',
    'enable_weights_cpu_backup', 'enforce_disable_flashinfer_allreduce_fusion', 'enforce_shared_experts_fusion',
    'ep_dispatch_algorithm', 'ep_join_mode', 'ep_join_rank_offset', 'ep_num_redundant_experts', 'ep_size',
    'eplb_algorithm', 'eplb_min_rebalancing_utilization_threshold', 'eplb_rebalance_layers_per_chunk',
    'eplb_rebalance_num_iterations', 'expert_balancedness_report_mode', 'expert_distribution_recorder_buffer_size',
    'expert_distribution_recorder_mode', 'export_metrics_to_file', 'export_metrics_to_file_dir', 'extra_metric_labels',
    'flashinfer_allreduce_fusion_backend', 'flashinfer_autotune_skip_ops', 'flashinfer_mla_disable_ragged',
    'flashinfer_mxfp4_moe_precision', 'forward_pass_metrics_ipc_name', 'forward_pass_metrics_worker_id',
    'fp4_gemm_runner_backend', 'fp8_gemm_runner_backend', 'fuseep_mode', 'gc_threshold', 'gc_warning_threshold_secs',
    'generation_tokens_buckets', 'grammar_backend', 'hicache_host_memory_mode', 'hicache_io_backend',
    'hicache_mem_layout', 'hicache_ratio', 'hicache_size', 'hicache_storage_backend',
    'hicache_storage_backend_extra_config', 'hicache_storage_prefetch_policy', 'hicache_write_policy',
    'http2_max_concurrent_streams', 'init_expert_location', 'kv_events_config', 'load_snapshot_publish_interval',
    'log_level', 'log_level_http', 'log_requests', 'log_requests_format', 'log_requests_level', 'log_requests_target',
    'mamba_backend', 'max_ep_size', 'min_free_slots_delay', 'mm_attention_backend', 'moe_a2a_backend',
    'moe_dense_tp_size', 'moe_runner_backend', 'mooncake_ib_device', 'num_continuous_decode_steps', 'numa_node',
    'otlp_traces_endpoint', 'pre_warm_nccl', 'prefill_attention_backend', 'prefill_decode_interval',
    'prefill_delayer_forward_passes_buckets', 'prefill_delayer_max_delay_ms', 'prefill_delayer_max_delay_passes',
    'prefill_delayer_queue_min_ratio', 'prefill_delayer_token_usage_low_watermark',
    'prefill_delayer_wait_seconds_buckets', 'prefill_max_requests', 'prompt_tokens_buckets', 'radix_cache_backend',
    'radix_eviction_policy', 'retraction_policy', 'sampling_backend', 'schedule_conservativeness', 'schedule_policy',
    'scheduler_recv_interval', 'show_time_cost', 'skip_server_warmup', 'sleep_on_idle', 'smg_http_sidecar_port',
    'soft_watchdog_timeout', 'startup_weight_load_mode', 'stat_loggers', 'tbo_token_distribution_threshold',
    'tokenizer_metrics_allowed_custom_labels', 'tokenizer_metrics_custom_labels_header', 'tokenizer_worker_num',
    'torch_compile_max_bs', 'trace_modules', 'triton_attention_num_kv_splits', 'triton_attention_reduce_in_fp32',
    'triton_attention_split_tile_size', 'use_ray', 'uvicorn_access_log_exclude_prefixes', 'warmups', 'watchdog_timeout',
    'weight_loader_disable_mmap', 'weight_loader_drop_cache_after_load', 'weight_loader_prefetch_checkpoints',
    'weight_loader_prefetch_num_threads',
})

# LoRA's tuning, read only where LoRA is enabled (server_args.py::check_lora_server_args under `if self.enable_lora`, the
# LoRA manager): hotswap refuses enable_lora and lora_paths, so these never apply. AReaL's launch line always sets
# max_loaded_loras and lora_backend (cli_args.py::SGLangConfig defaults)
LORA_ONLY: frozenset[str] = frozenset({
    'max_lora_rank', 'lora_target_modules', 'max_loaded_loras', 'lora_eviction_policy', 'lora_backend', 'max_lora_chunk_size',
    'enable_lora_overlap_loading',
})
