# Modeling code of a model exported by moectl (`moectl convert RUN --to hf OUT`).
#
# The model is moectl's engine itself: the moectl_core*.py files next to this one are moectl/core/
# with their imports made relative (and the plugin modules the model's parts come from, likewise),
# so this folder computes exactly what moectl computes. This file only wraps the engine for
# transformers:
#     AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
# config.moectl_args holds the engine's arguments (`ModelArgs.to_dict()`). The model computes what
# moectl computes in evaluation: dropless routing (a capacity factor limits training batches only).
# `generate()` runs the whole sequence at every step (no key/value cache).
#
# This file is the template moectl writes into each exported folder (moectl/convert/remote/); the
# line below the engine's imports lists what the export adds (plugin parts, and the modules that
# transformers' loader would not find otherwise).

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .moectl_core import MoETransformer
from .moectl_core_accounting import component_parameters
from .moectl_core_config import ModelArgs
from .moectl_core_generation import check_generatable
from .moectl_core_losses import IGNORE_INDEX
from .moectl_core_routers_base import RoutingMode

# moectl: generated imports

DECODING = RoutingMode(decoding=True)   # evaluation routing: every token as if alone (dropless)


class MoectlConfig(PretrainedConfig):
    model_type = "moectl"

    def __init__(self, moectl_args=None, **kwargs):
        self.moectl_args = dict(moectl_args or {})
        a = self.moectl_args
        if a:
            kwargs.setdefault("vocab_size", a["vocab_size"])
            kwargs.setdefault("hidden_size", a["d_model"])
            kwargs.setdefault("num_hidden_layers", a["n_layers"])
            kwargs.setdefault("num_attention_heads", a["n_heads"])
            kwargs.setdefault("max_position_embeddings", a["seq_len"])
            kwargs.setdefault("tie_word_embeddings", a["tie_embeddings"])
        super().__init__(**kwargs)


class MoectlForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MoectlConfig
    base_model_prefix = "model"
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.model = MoETransformer(ModelArgs.from_dict(config.moectl_args))
        # Everything of a router (gates, biases, recurrent cells, hash tables) stays fp32 in any dtype:
        # built fp32 whatever the default dtype, loaded fp32 (transformers' keep-in-fp32 lists name
        # every router tensor), and left fp32 by a cast of the model (see `_apply`). The engine's
        # routers compute in fp32 from the tensors of the rest in whatever dtype they have, as moectl
        # does with a model loaded in bf16.
        routers = [f"model.{name}" for name, _ in self._router_tensors()]
        self._keep_in_fp32_modules = self._keep_in_fp32_modules_strict = routers
        for _, t in self._router_tensors():
            if t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()
        if self.model.args.tie_embeddings:
            self._tied_weights_keys = {"model.head.weight": "model.embed.weight"}
        self.post_init()

    def _router_tensors(self):
        """(name in the engine, tensor) of every parameter and buffer of a router."""
        return [(name, t) for name, t, component, _ in component_parameters(self.model, buffers=True)
                if component == "router"]

    def _apply(self, fn, recurse=True):
        # Every cast and move of the model (`.to(torch.bfloat16)`, `.half()`, `.cuda()`, ...) comes
        # here: a router's tensors (and their gradients) follow a move to another device but keep fp32.
        if "model" not in self._modules:   # not built yet
            return super()._apply(fn, recurse)
        keep = set()
        for _, t in self._router_tensors():
            keep.add(id(t))
            if t.grad is not None:
                keep.add(id(t.grad))

        def apply(t):
            out = fn(t)
            if id(t) in keep and out.is_floating_point() and out.dtype != torch.float32:
                out = t.to(device=out.device, dtype=torch.float32)
            return out

        return super()._apply(apply, recurse)

    def _init_weights(self, module):
        # Every tensor comes from the folder's weights; buffers a part computes when it is built
        # (not saved) are computed again, by a model built on the CPU.
        computed = [n for n, _ in module.named_buffers(recurse=False) if n in module._non_persistent_buffers_set]
        if computed and any(m is module for m in self.model.modules()):
            reference = dict(self._built().named_modules())[self._name_of(module)]
            for name in computed:
                getattr(module, name).copy_(getattr(reference, name))

    def _built(self):
        if getattr(self, "_reference", None) is None:
            with torch.device("cpu"), torch.random.fork_rng(devices=[]):
                self._reference = [MoETransformer(self.model.args)]   # a list: not a submodule
        return self._reference[0]

    def _name_of(self, module):
        return next(name for name, m in self.model.named_modules() if m is module)

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.head

    def set_output_embeddings(self, value):
        self.model.head = value

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # No key/value cache: every step runs the whole sequence (routing may depend on it).
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def generate(self, *args, **kwargs):
        # A router that looks at the whole batch (expert choice) would route a decoded token unlike
        # in training: refused, as `moectl generate` refuses it. Scoring with forward() still works.
        check_generatable(self.model)
        return super().generate(*args, **kwargs)

    def engine(self, input_ids, targets=None):
        """The one call of moectl's forward: dropless routing, as moectl decodes and evaluates."""
        return self.model(input_ids, targets, mode=DECODING, return_logits=True)

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, **kwargs):
        if input_ids is None:
            raise ValueError("this model needs input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported: give sequences of one length, unpadded")
        targets = None
        if labels is not None:   # labels are the inputs (transformers' convention); moectl's targets the next tokens
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        out = self.engine(input_ids, targets)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)
