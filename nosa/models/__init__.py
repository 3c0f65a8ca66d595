from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from nosa.config import NosaConfig
from nosa.models.cache import NosaCache
from nosa.models.decode_step import DecodeStep
from nosa.models.convert import nosa_config_from_llama
from nosa.models.modeling_nosa import NosaForCausalLM, NosaModel, NosaPreTrainedModel, causal_lm_loss

convert_llama = NosaForCausalLM.from_llama  # the conversion, under its function name

AutoConfig.register("nosa", NosaConfig, exist_ok=True)
AutoModel.register(NosaConfig, NosaModel, exist_ok=True)
AutoModelForCausalLM.register(NosaConfig, NosaForCausalLM, exist_ok=True)

__all__ = [
    "NosaConfig", "NosaModel", "NosaForCausalLM", "NosaPreTrainedModel", "causal_lm_loss",
    "convert_llama", "nosa_config_from_llama", "NosaCache", "DecodeStep",
]
