"""The second cache tier the CPU tests use: vLLM's own ExampleConnector (a KV store on disk, real
loads into the engine's KV cache), with the request's cache_salt added to the key of what it
stores and finds. ExampleConnector keys its store by token ids alone, so a salted cold request
would find [A, B] there; vLLM's native host tier keys by the block hashes, which hold the salt.

    --kv-transfer-config "$(conftest.kv_transfer_config(DIR))"     with tests/ on PYTHONPATH
"""
import types

from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ExampleConnector


class SaltedExampleConnector(ExampleConnector):
    """ExampleConnector whose stored prompts are keyed by the salt and the token ids together:
    the salt rides along as the first of the multimodal hashes that ExampleConnector already
    mixes into its key."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._salts = {}                    # request id -> cache_salt, from the scheduler's lookup

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        self._salts[request.request_id] = request.cache_salt
        return super().get_num_new_matched_tokens(request, num_computed_tokens)

    def _found_match_for_request(self, request):
        return self._found_match_for_prompt(list(request.prompt_token_ids or []),
                                            salted([f.identifier for f in request.mm_features], request.cache_salt))

    def build_connector_meta(self, scheduler_output):
        originals = []
        for new_req in scheduler_output.scheduled_new_reqs:
            originals.append((new_req, new_req.mm_features))
            salt = self._salts.pop(new_req.req_id, None)
            if salt is not None:
                new_req.mm_features = [types.SimpleNamespace(identifier=f"salt:{salt}"), *new_req.mm_features]
        try:
            return super().build_connector_meta(scheduler_output)
        finally:
            for new_req, features in originals:        # the scheduler's output is not ours to change
                new_req.mm_features = features


def salted(mm_hashes, salt):
    return ([f"salt:{salt}"] if salt is not None else []) + mm_hashes
