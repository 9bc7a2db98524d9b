"""A user's mistake: one sentence naming the key and what is allowed, exit 2, nothing written."""

import os

import pytest

from tests.helpers import run_main

TINY = 'configs/adm_ffhq256.py:tiny'

CASES = {
    'unknown key': (['--config.totl_steps=5'], ['totl_steps', 'total_steps']),
    'unknown nested key': (['--config.optimizer.lr=0.1'], ['optimizer.lr', 'learning_rate']),
    'wrong type': (['--config.total_steps=many'], ['total_steps', 'integer']),
    'wrong bool': (['--config.data.random_flip=maybe'], ['random_flip', 'true or false']),
    'group set as value': (['--config.optimizer=adam'], ['optimizer', 'group']),
    'missing dataset': (['--config.data.name=folder', '--config.data.path=/nonexistent/ffhq'],
                        ['data.path', '/nonexistent/ffhq']),
    'data setting the source does not read': (['--config.data.path=/nonexistent/dataset'],
                                              ['data.path', 'data.name=folder', 'sample_faces']),
    'impossible mesh': (['--config.mesh.data=3'], ['mesh', 'devices']),
    'bad dtype': (['--config.compute_dtype=float16'], ['compute_dtype', 'bfloat16']),
    'unknown sampler': (['--config.sampler.name=magic'], ['sampler', 'magic']),
}


# Each system's validate(config) runs before anything is built or written; a model's own
# ValueError comes back naming the config key.
SYSTEM_CASES = {
    'patchdm setting': ('configs/patchdm_1k.py:tiny', ['--config.codes.source=vae'],
                        ['config.codes.source', 'vae', 'table, encoder']),
    'patchdm model': ('configs/patchdm_1k.py:tiny', ['--config.model.patch_size=10'],
                      ['config.model: patch_size=10', 'half a patch']),
    'adm model': (TINY, ['--config.model.attention_resolutions=7'],
                  ['config.model: attention_resolutions contains 7']),
    'maskclip model': ('configs/maskclip_coco.py:tiny', ['--config.model.rma_layers=2,9'],
                       ['config.model: rma_layers=(2, 9)', '1..4']),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_user_mistake_exits_2_with_one_sentence_and_writes_nothing(tmp_path, name):
  overrides, must_mention = CASES[name]
  workdir = tmp_path / 'run'
  result = run_main(f'--config={TINY}', f'--workdir={workdir}', *overrides, devices=2)
  _check_one_sentence_and_nothing_written(result, must_mention, workdir)


@pytest.mark.parametrize('name', sorted(SYSTEM_CASES))
def test_system_settings_are_checked_before_anything_is_written(tmp_path, name):
  config, overrides, must_mention = SYSTEM_CASES[name]
  workdir = tmp_path / 'run'
  result = run_main(f'--config={config}', f'--workdir={workdir}', *overrides)
  _check_one_sentence_and_nothing_written(result, must_mention, workdir)


def _check_one_sentence_and_nothing_written(result, must_mention, workdir):
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
  for word in must_mention:
    assert word in lines[0]
  assert 'Traceback' not in result.stderr
  assert not workdir.exists()


@pytest.mark.parametrize('args, word', [
    (['--config=configs/nope.py'], 'nope.py'),
    (['--config=configs/adm_ffhq256.py:huge'], 'huge'),
    ([f'--config={TINY}', '--mode=dance'], 'dance'),
    ([f'--config={TINY}', '--bogus_flag=1'], 'bogus_flag'),
])
def test_bad_command_line_exits_2(tmp_path, args, word):
  workdir = tmp_path / 'run'
  result = run_main(*args, f'--workdir={workdir}')
  assert result.returncode == 2, result.stderr[-3000:]
  assert word in result.stderr and 'Traceback' not in result.stderr
  assert not workdir.exists()


def test_sample_mode_without_checkpoint_says_train_first(tmp_path):
  result = run_main(f'--config={TINY}', f'--workdir={tmp_path}', '--mode=sample')
  assert result.returncode == 2 and 'train first' in result.stderr
  assert os.listdir(tmp_path) == []
