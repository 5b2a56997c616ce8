"""jupyter_kernel_test's conformance suite against the installed moelab-rust kernelspec,
for every message type the kernel claims: kernel_info, execute (stdout, stderr,
execute_result, display_data, error), is_complete, complete, inspect and history."""

import unittest

import jupyter_kernel_test

TINY = """%%experiment
name = "conformance"
variant = "topk"
[model]
d_model = 16
d_ffn = 16
n_experts = 4
top_k = 2
n_layers = 1
tokens_per_rank = 16
[layout]
ep = 2
[run]
backend = "cpu"
steps = 1
warmup = 0
"""


class MoelabKernelTests(jupyter_kernel_test.KernelTests):
    kernel_name = "moelab-rust"
    language_name = "rust"
    file_extension = ".rs"

    code_hello_world = 'println!("hello, world");'
    code_stderr = 'eprintln!("to stderr");'
    code_generate_error = 'let x: u32 = "not a number";'
    code_execute_result = [
        {"code": "1 + 2", "result": "3"},
        {"code": '"moe".to_string()', "result": '"moe"'},
    ]
    # %%experiment shows its charts as display_data (the table is the execute_result).
    code_display_data = [{"code": TINY, "mime": "image/svg+xml"}]
    completion_samples = [{"text": "std::collections::HashM"}]
    complete_code_samples = ["1 + 1", "fn f() {}", "let v = vec![1, 2];", TINY]
    incomplete_code_samples = ["fn f() {", "let v = vec![1,", 'let s = "open']
    invalid_code_samples = ["}", "let x = (1];"]
    code_history_pattern = "1 + *"
    supported_history_operations = ("tail", "range", "search")
    code_inspect_sample = "std::vec::Vec"

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # The first Rust cell waits for evcxr and the moelab prelude; later cells take a
        # second or two, well inside the suite's 15 s per request.
        reply = cls.kc.execute_interactive("1", timeout=300)
        assert reply["content"]["status"] == "ok", reply["content"]


if __name__ == "__main__":
    unittest.main(verbosity=2)
