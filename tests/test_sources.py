"""Each source adapter on fixtures in its dataset's real format (rows copied from the real files where
we have them), and the fail-fast errors that name the file and the format."""
import os

import pytest

from tmass.shards.sources import SOURCES, AnnotationError, SourceOptions


def items(source, split, **kw):
    return SOURCES[source].items(split, SourceOptions(**kw))


def by_id(its):
    return {it.video_id: it for it in its}


def test_msrvtt_train_carries_every_caption_of_its_videos(fixtures_dir):
    d = os.path.join(fixtures_dir, "msrvtt")
    its = items("msrvtt", "train", anno_dir=d, videos_dir="/v")
    assert [it.video_id for it in its] == ["video0", "video1", "video2", "video3"]  # the 9k csv's order
    m = by_id(its)
    assert m["video0"].captions == ["a car is shown", "a group of people dance in a street", "a man drives a red car"]
    assert m["video1"].captions == ["a woman is cooking", "someone chops onions in a kitchen"]
    assert m["video3"].captions == []  # not in the json: the builder lists it as 'empty caption'
    assert m["video2"].path == "/v/video2.mp4"
    seven = items("msrvtt", "train", anno_dir=d, videos_dir="/v", msrvtt_train_file="7k")
    assert [it.video_id for it in seven] == ["video0", "video1000"]
    assert by_id(seven)["video1000"].captions == ["two men talk about football"]


def test_msrvtt_val_count_holds_train_videos_out(fixtures_dir):
    """--val_count N: N train videos form the val split and leave train; the two partition the train csv, the
    choice follows --seed; without it, asking for val says how to get one."""
    d = os.path.join(fixtures_dir, "msrvtt")
    full = [it.video_id for it in items("msrvtt", "train", anno_dir=d, videos_dir="/v")]
    train = [it.video_id for it in items("msrvtt", "train", anno_dir=d, videos_dir="/v", val_count=1)]
    val = by_id(items("msrvtt", "val", anno_dir=d, videos_dir="/v", val_count=1))
    assert len(val) == 1 and sorted(train + list(val)) == sorted(full) and not set(train) & set(val)
    assert train == [v for v in full if v not in val]  # the csv's order kept
    (vid,) = val
    assert val[vid].captions == by_id(items("msrvtt", "train", anno_dir=d, videos_dir="/v"))[vid].captions
    picks = {next(iter(by_id(items("msrvtt", "val", anno_dir=d, videos_dir="/v", val_count=1, seed=s))))
             for s in range(8)}
    assert len(picks) > 1
    assert SOURCES["msrvtt"].splits_for(SourceOptions(val_count=1)) == ("train", "val", "test")
    with pytest.raises(AnnotationError, match="pass --val_count N"):
        items("msrvtt", "val", anno_dir=d, videos_dir="/v")
    with pytest.raises(AnnotationError, match="leaves no training video"):
        items("msrvtt", "train", anno_dir=d, videos_dir="/v", val_count=4)


def test_msrvtt_test_is_the_jsfusion_1k_a_rows(fixtures_dir):
    its = items("msrvtt", "test", anno_dir=os.path.join(fixtures_dir, "msrvtt"), videos_dir="/v")
    assert [(it.video_id, it.captions) for it in its] == [
        ("video9770", ["a person is connecting something to system"]),
        ("video9771", ["a little girl does gymnastics"]),
        ("video7020", ["a woman creating a fondant baby and flower"])]


def test_msrvtt_errors_name_the_file_and_format(fixtures_dir, tmp_path):
    with pytest.raises(AnnotationError, match=r"MSRVTT_data\.json: file not found.*sentences"):
        items("msrvtt", "train", anno_dir=str(tmp_path), anno=os.path.join(fixtures_dir, "msrvtt",
                                                                             "MSRVTT_train.9k.csv"), videos_dir="/v")
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video\nret0,msr1,video1\n")
    with pytest.raises(AnnotationError, match=r"MSRVTT_JSFUSION_test\.csv: missing column\(s\) video_id, sentence"):
        items("msrvtt", "test", anno_dir=str(tmp_path), videos_dir="/v")
    (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\n")
    (tmp_path / "MSRVTT_data.json").write_text('{"videos": []}')
    with pytest.raises(AnnotationError, match=r"MSRVTT_data\.json: the top-level object lacks sentences"):
        items("msrvtt", "train", anno_dir=str(tmp_path), videos_dir="/v")
    with pytest.raises(AnnotationError, match="--videos_dir"):
        items("msrvtt", "test", anno_dir=str(tmp_path))


def test_lsmdc_keeps_repeated_clip_captions_and_the_upstream_path_rule(fixtures_dir):
    its = items("lsmdc", "train", anno_dir=os.path.join(fixtures_dir, "lsmdc"), videos_dir="/v")
    m = by_id(its)
    assert len(its) == 3
    assert m["1001_Flight_00.00.57.675-00.01.01.839"].captions == ["SOMEONE walks into the cockpit.",
                                                                   "The pilot enters."]
    assert m["1001_Flight_00.01.02.000-00.01.05.500"].captions == ["He sits down and buckles in."]  # '"' stripped
    assert m["0005_Chinatown_00.10.00.100-00.10.03.200"].path == \
        "/v/0005_Chinatown/0005_Chinatown_00.10.00.100-00.10.03.200.avi"


def test_lsmdc_rejects_short_lines(fixtures_dir):
    with pytest.raises(AnnotationError, match=r"bad_fields\.csv:1: 5 tab-separated field\(s\), expected 6"):
        items("lsmdc", "train", anno=os.path.join(fixtures_dir, "lsmdc", "bad_fields.csv"), videos_dir="/v")


def test_didemo_rows_ids_extensions_and_times(fixtures_dir, tmp_path):
    (tmp_path / "58792004@N06_8544469262_fd25eddb2e.mp4").write_bytes(b"x")  # the csv names it with no extension
    its = items("didemo", "test", anno_dir=os.path.join(fixtures_dir, "didemo"), videos_dir=str(tmp_path))
    assert [it.video_id for it in its] == ["test_data_id_00000", "test_data_id_00002", "test_data_id_00011",
                                           "test_data_id_00020"]
    assert its[0].path == str(tmp_path / "26292851@N04_4253489686_265c3c8051.m4v")
    assert its[1].captions[0].startswith("the object is travelling away, but then comes back")
    assert its[2].path == str(tmp_path / "58792004@N06_8544469262_fd25eddb2e.mp4")
    assert its[0].meta == {"starts": [0], "ends": [31]} and its[3].meta == {"starts": [0], "ends": [31]}
    with pytest.raises(AnnotationError, match=r"missing_text\.csv: missing column\(s\) text"):
        items("didemo", "test", anno=os.path.join(fixtures_dir, "didemo", "missing_text.csv"), videos_dir="/v")


def test_vatex_json(fixtures_dir):
    its = items("vatex", "val", anno_dir=os.path.join(fixtures_dir, "vatex"), videos_dir="/v")
    assert [it.video_id for it in its] == ["Ptf_2VRj-V0_000122_000132", "--33Lscn6sk_000004_000014"]
    assert len(its[0].captions) == 3 and its[1].captions[1] == "An artist works on a canvas."
    assert its[0].path == "/v/Ptf_2VRj-V0_000122_000132.mp4"
    with pytest.raises(AnnotationError, match=r"no_encap\.json: entry 0 lacks enCap"):
        items("vatex", "val", anno=os.path.join(fixtures_dir, "vatex", "no_encap.json"), videos_dir="/v")


def test_charades_script_or_descriptions(fixtures_dir):
    d = os.path.join(fixtures_dir, "charades")
    its = items("charades", "test", anno_dir=d, videos_dir="/v")
    assert its[1].captions == ["A person opens a closet, takes a towel and leaves."]
    assert its[0].path == "/v/YSKX3.mp4"
    desc = items("charades", "test", anno_dir=d, videos_dir="/v", charades_text="descriptions")
    assert desc[0].captions == ["A person cooks food. Then they drink some water."]
    with pytest.raises(AnnotationError, match=r"Charades_v1_train\.csv: file not found"):
        items("charades", "train", anno_dir=d, videos_dir="/v")


@pytest.mark.parametrize("source, name", [("csv", "pairs.csv"), ("jsonl", "pairs.jsonl")])
def test_generic_lists_merge_captions_per_video(fixtures_dir, source, name):
    its = items(source, "train", anno=os.path.join(fixtures_dir, "generic", name), videos_dir="/data")
    assert [(it.video_id, it.path) for it in its] == [("a", "/data/clips/a.mp4"), ("cat_b", "/abs/b.avi")]
    assert its[0].captions[:2] == ["a dog runs", "a puppy is running on grass"]


def test_generic_errors(fixtures_dir):
    with pytest.raises(AnnotationError, match="needs --anno"):
        items("csv", "train")
    with pytest.raises(AnnotationError, match=r"bad\.jsonl:1: needs 'video' and 'caption'"):
        items("jsonl", "train", anno=os.path.join(fixtures_dir, "generic", "bad.jsonl"))
    with pytest.raises(AnnotationError, match="no split 'dev'"):
        items("didemo", "dev", anno_dir=fixtures_dir, videos_dir="/v")
