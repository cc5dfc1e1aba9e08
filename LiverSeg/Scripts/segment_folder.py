"""Headless batch segmentation through the module's Logic, without any dialog.

    Slicer --no-main-window --python-script LiverSeg/Scripts/segment_folder.py -- IN_DIR OUT_DIR [--device cpu]

Every CT file in IN_DIR (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd) and every sub-folder holding a DICOM series is
loaded, segmented by ``LiverSegLogic.process`` (the engine in a child process, as the module's button runs
it) and saved as ``OUT_DIR/NAME.seg.nrrd``; one line per case is printed, failures are reported and skipped,
and Slicer exits with 0 only when every case succeeded.
"""

import argparse
import os
import sys

import slicer

from LiverSegLib.io import IMAGE_SUFFIXES as CT_SUFFIXES
from LiverSegLib.options import DEVICES


def cases(input_dir):
    for name in sorted(os.listdir(input_dir)):
        path = os.path.join(input_dir, name)
        if os.path.isdir(path):
            yield name, path
        elif name.lower().endswith(CT_SUFFIXES) and not name.lower().endswith(".seg.nrrd"):
            yield name.split(".")[0], path


def load(path):
    if os.path.isdir(path):
        from DICOMLib import DICOMUtils

        with DICOMUtils.TemporaryDICOMDatabase() as database:
            DICOMUtils.importDicom(path, database)
            node_ids = []
            for patient in database.patients():
                node_ids += DICOMUtils.loadPatientByUID(patient)
        volumes = [slicer.mrmlScene.GetNodeByID(i) for i in node_ids]
        volumes = [v for v in volumes if v is not None and v.IsA("vtkMRMLScalarVolumeNode")]
        if len(volumes) != 1:
            raise ValueError(f"{path} holds {len(volumes)} image series; put one series per folder")
        return volumes[0]
    return slicer.util.loadVolume(path)


def main(argv):
    parser = argparse.ArgumentParser(prog="segment_folder.py")
    parser.add_argument("input_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--no-lesions", action="store_true")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.input_dir):
        print(f"error: input folder does not exist: {args.input_dir}")
        return 2
    os.makedirs(args.output_dir, exist_ok=True)

    import LiverSeg

    logic = LiverSeg.LiverSegLogic()
    try:
        logic.ensureDependencies(args.device, askConfirmation=False)
    except Exception as error:  # a failed install: one line, not a traceback
        print(f"error: the Python packages LiverSeg needs could not be installed: {error}")
        return 2
    failures = 0
    for name, path in cases(args.input_dir):
        slicer.mrmlScene.Clear()
        try:
            volume = load(path)
            segmentation = logic.process(volume, device=args.device, lesions=not args.no_lesions)
            output = os.path.join(args.output_dir, f"{name}.seg.nrrd")
            if not slicer.util.saveNode(segmentation, output):
                raise OSError(f"could not write {output}")
            print(f"{name}: {segmentation.GetAttribute('LiverSeg.Summary')} -> {output}")
        except Exception as error:  # one line per failed case, then go on
            failures += 1
            print(f"{name}: error: {error}")
    return 1 if failures else 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    slicer.app.exit(code)
    sys.exit(code)
