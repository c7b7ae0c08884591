"""A user-defined tool and environment for posttrain's multi-turn RL (README: "Environments and
tools"). Name them in a recipe as `examples.letter_env:LetterCountEnv` and
`examples.letter_env:word_length`; run posttrain from the directory that holds `examples/`."""

from posttrain.envs.tools import parse_tool_call


def word_length(word: str) -> str:
    """Count the letters of a word.

    Args:
        word: The word to measure.
    """
    return str(len(word))


class LetterCountEnv:
    """'How many letters has X?': the policy may call `word_length`, then answers with a number.
    Reward 1 for the right count, 0 otherwise; a malformed or unknown call gets an error message
    and another turn (up to max_turns)."""

    def __init__(self, tools):  # the recipe's tools (and the row's): name -> callable
        self.tools = tools

    def reset(self, row):  # one instance per sampled conversation
        self.answer = str(row["answer"])
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, message):
        call = parse_tool_call(message["content"])
        if call is None:  # no tool call: this is the answer
            return [], float(message["content"].strip() == self.answer), True
        if isinstance(call, str):  # malformed call: the parser says why
            return [{"role": "tool", "content": call}], None, False
        name, arguments = call
        if name not in self.tools:
            return [{"role": "tool", "content": f"error: no tool {name}"}], None, False
        result = self.tools[name](**arguments)  # an exception here ends the episode, counted
        return [{"role": "tool", "name": name, "content": result}], None, False
